/**
 * The gateway's browser client.
 *
 * ```js
 * import { Client } from "/client.js";
 * const client = new Client("wss://example.com/ws", { getToken, name: "Ada" });
 * const room = client.subscribe("chat:room", { history: 50 });
 * room.on("publication", (p) => show(p));
 * room.on("reset", () => reload());           // history could not be recovered
 * await client.publish("chat:room", "hello");  // retried safely: never a duplicate
 * ```
 *
 * One WebSocket, reconnected with exponential backoff and full jitter as the close code
 * says; subscriptions remember their (epoch, offset) and recover what they missed;
 * publishes carry an idempotency key and are retried; images go up as content-addressed
 * blobs (hashed first, so a blob the server has is not sent again); `rpc` asks the
 * backend and `latest` keeps at most one call in flight and one waiting.
 */
import { create } from "@bufbuild/protobuf";
import { type Backoff, DEFAULT_BACKOFF, backoffDelay } from "./backoff.js";
import { type Codec, frame, protoCodec } from "./codec.js";
import { Emitter } from "./emitter.js";
import {
  type BlobRef,
  BlobGetSchema,
  BlobPutSchema,
  BlobRefSchema,
  type ClientFrame,
  type ClientInfo,
  ConnectSchema,
  HistoryRequestSchema,
  PingSchema,
  PresenceRequestSchema,
  type Publication,
  PublishSchema,
  RpcSchema,
  type ServerFrame,
  type SubscribeResult,
  SubscribeSchema,
  UnsubscribeSchema,
} from "./gen/gateway/v1/gateway_pb.js";
import { Latest } from "./latest.js";
import { closeReaction, isTemporary } from "./policy.js";
import { Position } from "./position.js";

export type { BlobRef, ClientInfo, Publication } from "./gen/gateway/v1/gateway_pb.js";
export type { Codec } from "./codec.js";
export { protoCodec } from "./codec.js";
export { Latest } from "./latest.js";

export type State = "connecting" | "connected" | "disconnected" | "closed";

export interface ClientOptions {
  /** A token (JWT) for the first connection. */
  token?: string;
  /** Called for a token before connecting, and again when it expired (close 4003,
   * error 109). */
  getToken?: () => Promise<string>;
  /** Display name, shown to others in presence, Join and Leave. */
  name?: string;
  /** Wire encoding: binary by default; `jsonCodec` from `./json` for text frames. */
  codec?: Codec;
  /** Reconnect delays (full jitter). */
  backoff?: Backoff;
  /** The client pings when it heard nothing for this long (ms)... */
  pingIntervalMs?: number;
  /** ...and drops the connection as dead when nothing answers within this (ms). */
  pingTimeoutMs?: number;
  /** How long a command waits for its reply (ms). */
  requestTimeoutMs?: number;
  /** A WebSocket implementation (for Node); the browser's by default. */
  WebSocket?: typeof WebSocket;
  /** Connect at once (default); otherwise call `connect()`. */
  autoConnect?: boolean;
}

export interface ClientEvents {
  state: State;
  connected: { client: string; node: string };
  disconnected: { code: number; reason: string; reconnectInMs: number | null };
  error: GatewayError;
}

export interface SubscriptionEvents {
  publication: Publication;
  join: ClientInfo;
  leave: ClientInfo;
  /** Live, after the first subscribe or a resubscribe (`recovered`: nothing was missed). */
  subscribed: { epoch: string; offset: bigint; recovered: boolean; resubscribed: boolean };
  /** The stream restarted or what was missed could not be recovered: reload state. */
  reset: { reason: "epoch" | "recovery-failed"; epoch: string };
  error: GatewayError;
}

export interface SubscribeOptions {
  /** Deliver up to this many recent publications first (history on join). */
  history?: number;
  /** Resume from a position saved earlier (recovering what came after it). */
  since?: { epoch: string; offset: bigint };
  /**
   * Subscription token for a channel of a private namespace (a JWT from your backend
   * with `sub` and `channel`). A function is asked again at every (re)subscribe, so a
   * fresh token can be fetched.
   */
  token?: string | (() => string | Promise<string>);
}

export interface PublishOptions {
  contentType?: string;
  /** Stored blobs to attach (ids or refs from `uploadBlob`). */
  blobs?: (string | BlobRef)[];
  /** Chosen automatically; the same key makes a retry a no-op on the server. */
  idempotencyKey?: string;
  /** Give up retrying after this long (ms). */
  timeoutMs?: number;
}

export interface UploadOptions {
  /** The claimed type; the server checks the bytes. Default: the File's type. */
  contentType?: string;
  /** Progress: bytes acknowledged of the total. */
  onProgress?: (sent: number, total: number) => void;
  /** Chunk size (bytes). */
  chunkBytes?: number;
}

export interface RpcAnswer {
  data: Uint8Array;
  contentType: string;
}

/** An error reply (`code` from DESIGN.md), or 0 for "the connection dropped". */
export class GatewayError extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly temporary: boolean,
  ) {
    super(message);
    this.name = "GatewayError";
  }
}

type Command = ClientFrame["command"];
type Body = ServerFrame["body"];

interface Request {
  frame: ClientFrame;
  /** Survives reconnects: sent again on the next connection (publishes). */
  retry: boolean;
  /** Only on the connection it was sent on (upload chunks, downloads). */
  live: boolean;
  sent: boolean;
  timer: ReturnType<typeof setTimeout> | undefined;
  /** Takes a reply frame; true when the request is complete. */
  onReply: (f: ServerFrame) => boolean;
  reject: (e: GatewayError) => void;
}

const UPLOAD_WINDOW = 4;
const MAX_FRAMES_PER_MESSAGE = 64;

const now = () => Date.now();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const encoder = new TextEncoder();

function randomKey(): string {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

export async function sha256Hex(bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return Array.from(new Uint8Array(digest), (x) => x.toString(16).padStart(2, "0")).join("");
}

function replyError(f: ServerFrame): GatewayError | undefined {
  const e = f.error;
  return e ? new GatewayError(e.code, e.message, isTemporary(e.code, e.temporary)) : undefined;
}

export class Client extends Emitter<ClientEvents> {
  readonly url: string;
  #o: Required<Pick<ClientOptions, "pingIntervalMs" | "pingTimeoutMs" | "requestTimeoutMs">> &
    ClientOptions;
  #codec: Codec;
  #ws: WebSocket | undefined;
  #state: State = "disconnected";
  #stopped = false;
  #attempt = 0;
  #nextId = 1;
  #nextUpload = 1;
  #requests = new Map<number, Request>();
  #outgoing: ClientFrame[] = [];
  #flushing = false;
  #subs = new Map<string, Subscription>();
  #token: string | undefined;
  #serverCode: { code: number; reason: string } | undefined;
  #reconnect: ReturnType<typeof setTimeout> | undefined;
  #pinger: ReturnType<typeof setInterval> | undefined;
  #heard = 0;
  #pingSent = 0;
  #refreshed = 0;
  /** When the current socket was opened. */
  #openedAt = 0;
  #maxMessage = 1 << 20;
  /** The session: client id and node (once connected). */
  session: { client: string; node: string } | undefined;

  constructor(url: string, options: ClientOptions = {}) {
    super();
    this.url = url;
    this.#o = { pingIntervalMs: 5_000, pingTimeoutMs: 4_000, requestTimeoutMs: 30_000, ...options };
    this.#codec = options.codec ?? protoCodec;
    this.#token = options.token;
    if (options.autoConnect !== false) this.connect();
  }

  get state(): State {
    return this.#state;
  }

  /** Starts connecting (again, after `close`). */
  connect(): void {
    this.#stopped = false;
    if (!this.#ws && !this.#reconnect) this.#open();
  }

  /** Closes for good: no reconnect; commands in flight fail. */
  close(): void {
    this.#stopped = true;
    clearTimeout(this.#reconnect);
    this.#reconnect = undefined;
    const ws = this.#ws;
    if (ws) {
      ws.close(1000);
      this.#closed(ws, 1000, "closed by the app");
    } else {
      this.#setState("closed");
      this.#failAll(new GatewayError(0, "client closed", false), true);
    }
  }

  subscribe(channel: string, options: SubscribeOptions = {}): Subscription {
    let sub = this.#subs.get(channel);
    if (sub) return sub;
    sub = new Subscription(this, channel, options, {
      send: (s) => this.#subscribeNow(s),
      unsubscribe: (s) => {
        this.#subs.delete(s.channel);
        if (this.#state === "connected") {
          const id = this.#id();
          this.#send(frame(id, { case: "unsubscribe", value: create(UnsubscribeSchema, { channel }) }));
        }
      },
      resubscribe: (s) => {
        if (this.#state !== "connected") return;
        this.#send(frame(0, { case: "unsubscribe", value: create(UnsubscribeSchema, { channel }) }));
        this.#subscribeNow(s);
      },
      history: (since, limit) => this.history(channel, { since, limit }),
    });
    this.#subs.set(channel, sub);
    if (this.#state === "connected") this.#subscribeNow(sub);
    return sub;
  }

  /** Publishes; retried with the same idempotency key on temporary failures and across
   * reconnects, so it is delivered once. */
  async publish(
    channel: string,
    data: Uint8Array | string,
    options: PublishOptions = {},
  ): Promise<{ offset: bigint; epoch: string }> {
    const value = create(PublishSchema, {
      channel,
      data: typeof data === "string" ? encoder.encode(data) : data,
      contentType: options.contentType ?? (typeof data === "string" ? "text/plain" : ""),
      idempotencyKey: options.idempotencyKey ?? randomKey(),
      blobs: (options.blobs ?? []).map((b) =>
        create(BlobRefSchema, typeof b === "string" ? { id: b } : { id: b.id, name: b.name }),
      ),
    });
    const deadline = now() + (options.timeoutMs ?? 60_000);
    for (let attempt = 0; ; attempt++) {
      try {
        const left = Math.max(1, deadline - now());
        const body = await this.#request({ case: "publish", value }, { retry: true, timeoutMs: left });
        if (body.case !== "publish") throw new GatewayError(104, "unexpected reply", false);
        return { offset: body.value.offset, epoch: body.value.epoch };
      } catch (e) {
        if (!(e instanceof GatewayError) || !e.temporary || this.#stopped || now() > deadline) throw e;
        await sleep(backoffDelay(attempt, { minMs: 250, maxMs: 5_000 }));
      }
    }
  }

  async presence(channel: string): Promise<ClientInfo[]> {
    const body = await this.#request({ case: "presence", value: create(PresenceRequestSchema, { channel }) });
    return body.case === "presence" ? body.value.clients : [];
  }

  /** Publications after `since` (up to `limit`), with the channel's current position. */
  async history(
    channel: string,
    options: { since?: bigint; limit?: number } = {},
  ): Promise<{ publications: Publication[]; offset: bigint; epoch: string }> {
    const value = create(HistoryRequestSchema, {
      channel,
      sinceOffset: options.since ?? 0n,
      limit: options.limit ?? 0,
    });
    const body = await this.#request({ case: "history", value });
    if (body.case !== "history") throw new GatewayError(104, "unexpected reply", false);
    return { publications: body.value.publications, offset: body.value.offset, epoch: body.value.epoch };
  }

  /** Asks the backend (`POST {rpc.url}/{method}`); the answer comes back binary. */
  async rpc(method: string, data: Uint8Array | string = new Uint8Array(), contentType = ""): Promise<RpcAnswer> {
    const value = create(RpcSchema, {
      method,
      data: typeof data === "string" ? encoder.encode(data) : data,
      contentType: contentType || (typeof data === "string" ? "text/plain" : "application/octet-stream"),
    });
    const body = await this.#request({ case: "rpc", value });
    if (body.case !== "rpc") throw new GatewayError(104, "unexpected reply", false);
    return { data: body.value.data, contentType: body.value.contentType };
  }

  /** `rpc(method, …)` keeping at most one call in flight and one waiting: a newer call
   * replaces the waiting one, which resolves `undefined`. */
  latest(method: string, contentType = ""): Latest<Uint8Array | string, RpcAnswer> {
    return new Latest((data: Uint8Array | string) => this.rpc(method, data, contentType));
  }

  /** Uploads an image to `channel` (where it will be published); returns its stored
   * reference. Hashed first: a blob the server already has for the channel is not sent
   * again. Restarted from the beginning if the connection drops. */
  async uploadBlob(channel: string, file: Blob | Uint8Array, options: UploadOptions = {}): Promise<BlobRef> {
    const bytes = file instanceof Uint8Array ? file : new Uint8Array(await file.arrayBuffer());
    if (bytes.length === 0) throw new GatewayError(113, "an empty file is not an image", false);
    const contentType = options.contentType || (file instanceof Blob ? file.type : "") || "application/octet-stream";
    const id = await sha256Hex(bytes);
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#upload(channel, bytes, contentType, id, options);
      } catch (e) {
        if (!(e instanceof GatewayError) || !e.temporary || this.#stopped || attempt >= 5) throw e;
        await sleep(backoffDelay(attempt, { minMs: 250, maxMs: 5_000 }));
        await this.#connected();
      }
    }
  }

  /** Downloads a blob over the WebSocket (usually an `<img src=blob.url>` is better: the
   * browser caches it). */
  getBlob(id: string, channel: string): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      const parts: Uint8Array[] = [];
      let size = 0;
      this.#track(frame(this.#id(), { case: "blobGet", value: create(BlobGetSchema, { id, channel }) }), {
        retry: false,
        live: true,
        reject,
        onReply: (f) => {
          const err = replyError(f);
          if (err) return reject(err), true;
          if (f.body.case !== "blobChunk") return reject(new GatewayError(104, "unexpected reply", false)), true;
          parts.push(f.body.value.data);
          size += f.body.value.data.length;
          if (!f.body.value.last) return false;
          const out = new Uint8Array(size);
          let at = 0;
          for (const p of parts) out.set(p, at), (at += p.length);
          resolve(out);
          return true;
        },
      });
    });
  }

  async #upload(
    channel: string,
    bytes: Uint8Array,
    contentType: string,
    id: string,
    options: UploadOptions,
  ): Promise<BlobRef> {
    await this.#connected();
    const chunk = Math.max(1024, Math.min(options.chunkBytes ?? 256 * 1024, this.#maxMessage - 1024));
    const upload = this.#nextUpload++;
    const total = bytes.length;
    const pieces = Math.max(1, Math.ceil(total / chunk));
    const put = (i: number) =>
      this.#request(
        {
          case: "blobPut",
          value: create(BlobPutSchema, {
            upload,
            data: bytes.subarray(i * chunk, Math.min(total, (i + 1) * chunk)),
            last: i === pieces - 1,
            ...(i === 0 ? { channel, contentType, size: BigInt(total), id } : {}),
          }),
        },
        { live: true },
      );
    let acked = 0;
    const done = (i: number) => {
      acked += Math.min(total, (i + 1) * chunk) - i * chunk;
      options.onProgress?.(acked, total);
    };
    // The first chunk claims the id: if the server has the blob, its reply says so.
    const first = await put(0);
    if (first.case === "blobPut" && first.value.blob) {
      options.onProgress?.(total, total);
      return first.value.blob;
    }
    done(0);
    const inFlight: Promise<Body>[] = [];
    let result: BlobRef | undefined;
    try {
      for (let i = 1; i < pieces; i++) {
        inFlight.push(put(i));
        if (inFlight.length >= UPLOAD_WINDOW || i === pieces - 1) {
          while (inFlight.length > (i === pieces - 1 ? 0 : UPLOAD_WINDOW - 1)) {
            const k = i - inFlight.length + 1;
            const body = await (inFlight.shift() as Promise<Body>);
            done(k);
            if (body.case === "blobPut" && body.value.blob) result = body.value.blob;
          }
        }
      }
    } catch (e) {
      // The chunks still in flight fail the same way: nobody is left to await them.
      for (const p of inFlight) p.catch(() => {});
      throw e;
    }
    if (!result) throw new GatewayError(113, "the upload ended without a blob", false);
    return result;
  }

  /** Resolves once connected; rejects if closed for good, or (temporary) after
   * `requestTimeoutMs`. */
  #connected(): Promise<void> {
    if (this.#state === "connected") return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(new GatewayError(0, "not connected in time", true));
      }, this.#o.requestTimeoutMs);
      const off = this.on("state", (s) => {
        if (s === "connected") clearTimeout(timer), off(), resolve();
        else if (s === "closed") clearTimeout(timer), off(), reject(new GatewayError(0, "client closed", false));
      });
    });
  }

  #request(command: Command, opts: { retry?: boolean; live?: boolean; timeoutMs?: number } = {}): Promise<Body> {
    return new Promise((resolve, reject) => {
      this.#track(frame(this.#id(), command), {
        retry: opts.retry ?? false,
        live: opts.live ?? false,
        timeoutMs: opts.timeoutMs,
        reject,
        onReply: (f) => {
          const err = replyError(f);
          if (err) reject(err);
          else resolve(f.body);
          return true;
        },
      });
    });
  }

  #track(
    f: ClientFrame,
    r: Pick<Request, "retry" | "live" | "onReply" | "reject"> & { timeoutMs?: number },
  ): void {
    if (this.#stopped) return r.reject(new GatewayError(0, "client closed", false));
    if (r.live && this.#state !== "connected") return r.reject(new GatewayError(0, "not connected", true));
    const { timeoutMs, ...rest } = r;
    const req: Request = { ...rest, frame: f, sent: false, timer: undefined };
    req.timer = setTimeout(() => {
      this.#requests.delete(f.id);
      req.reject(new GatewayError(0, "no reply in time", true));
    }, Math.min(timeoutMs ?? Infinity, this.#o.requestTimeoutMs));
    this.#requests.set(f.id, req);
    if (this.#state === "connected") {
      req.sent = true;
      this.#send(f);
    }
  }

  #id(): number {
    const id = this.#nextId;
    this.#nextId = this.#nextId >= 0xffff_fff0 ? 1 : this.#nextId + 1;
    return id;
  }

  #subscribeNow(sub: Subscription): void {
    const source = sub.tokenSource;
    if (typeof source !== "function") {
      this.#sendSubscribe(sub, source ?? "");
      return;
    }
    Promise.resolve()
      .then(source)
      .then(
        (token) => {
          if (this.#state === "connected" && this.#subs.get(sub.channel) === sub) this.#sendSubscribe(sub, token);
        },
        (e: unknown) => sub.failed(new GatewayError(101, `subscription token: ${String(e)}`, false)),
      );
  }

  #sendSubscribe(sub: Subscription, token: string): void {
    const value = create(SubscribeSchema, { channel: sub.channel, token, ...sub.recoverFrom() });
    const f = frame(this.#id(), { case: "subscribe", value });
    this.#requests.set(f.id, {
      frame: f,
      retry: false,
      live: true,
      sent: true,
      timer: undefined,
      reject: () => {},
      onReply: (reply) => {
        if (this.#subs.get(sub.channel) !== sub) return true; // unsubscribed meanwhile
        const err = replyError(reply);
        if (!err) {
          if (reply.body.case === "subscribe") sub.subscribed(reply.body.value);
          return true;
        }
        sub.failed(err);
        if (isTemporary(err.code, err.temporary)) {
          // The broker hiccuped (108, 100): try again while connected; recovery from the
          // subscription's position makes the retry lose nothing.
          const delay = backoffDelay(Math.min(sub.retries++, 6), { minMs: 500, maxMs: 10_000 });
          setTimeout(() => {
            if (this.#state === "connected" && this.#subs.get(sub.channel) === sub) this.#subscribeNow(sub);
          }, delay);
        } else {
          this.#subs.delete(sub.channel); // refused for good (102, 103, 106): the app decides
        }
        return true;
      },
    });
    this.#send(f);
  }

  #send(f: ClientFrame): void {
    this.#outgoing.push(f);
    if (!this.#flushing) {
      this.#flushing = true;
      queueMicrotask(() => this.#flush());
    }
  }

  /** Sends what was queued this turn in as few messages as the limits allow. */
  #flush(): void {
    this.#flushing = false;
    const ws = this.#ws;
    const frames = this.#outgoing;
    this.#outgoing = [];
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    let batch: ClientFrame[] = [];
    const send = () => {
      if (batch.length) ws.send(this.#codec.encode(batch) as Uint8Array<ArrayBuffer> | string);
      batch = [];
    };
    for (const f of frames) {
      // Upload chunks are large: each goes alone, within the message size limit.
      if (f.command.case === "blobPut") {
        send();
        batch = [f];
        send();
        continue;
      }
      batch.push(f);
      if (batch.length >= MAX_FRAMES_PER_MESSAGE) send();
    }
    send();
  }

  #setState(s: State): void {
    if (this.#state === s) return;
    this.#state = s;
    this.emit("state", s);
  }

  #open(): void {
    this.#reconnect = undefined;
    if (this.#stopped) return;
    this.#setState("connecting");
    const Ws = this.#o.WebSocket ?? WebSocket;
    let ws: WebSocket;
    try {
      ws = new Ws(this.url, [this.#codec.subprotocol]);
    } catch (e) {
      this.emit("error", new GatewayError(0, `cannot connect: ${e}`, false));
      this.#stopped = true;
      this.#setState("closed");
      return;
    }
    ws.binaryType = "arraybuffer";
    this.#ws = ws;
    this.#serverCode = undefined;
    this.#heard = now();
    this.#openedAt = this.#heard;
    this.#pingSent = 0;
    ws.onopen = () => void this.#handshake(ws);
    ws.onmessage = (ev) => this.#onMessage(ws, ev.data as ArrayBuffer | string);
    ws.onclose = (ev) => this.#closed(ws, ev.code, ev.reason);
    ws.onerror = () => {};
    // A connection that never opens (a dead proxy) counts as dropped.
    this.#watch(ws);
  }

  async #handshake(ws: WebSocket): Promise<void> {
    let token = this.#token;
    if (token === undefined && this.#o.getToken) {
      try {
        token = await this.#o.getToken();
        this.#token = token;
      } catch (e) {
        this.emit("error", new GatewayError(101, `getToken failed: ${e}`, true));
        return this.#drop(ws, 1006, "no token");
      }
    }
    if (ws !== this.#ws) return;
    const value = create(ConnectSchema, { token: token ?? "", name: this.#o.name ?? "", version: "web-0.1" });
    const f = frame(this.#id(), { case: "connect", value });
    this.#requests.set(f.id, {
      frame: f,
      retry: false,
      live: true,
      sent: true,
      timer: undefined,
      reject: () => {},
      onReply: (reply) => {
        const err = replyError(reply);
        if (err) {
          // 109 (expired): the close that follows (4003) refreshes the token.
          this.emit("error", err);
          return true;
        }
        if (reply.body.case === "connect") this.#ready(reply.body.value);
        return true;
      },
    });
    this.#send(f);
  }

  #ready(r: { client: string; node: string; maxMessageBytes: number }): void {
    this.#attempt = 0;
    this.#maxMessage = r.maxMessageBytes || this.#maxMessage;
    this.session = { client: r.client, node: r.node };
    this.#setState("connected");
    this.emit("connected", this.session);
    for (const sub of this.#subs.values()) this.#subscribeNow(sub);
    // Commands made while disconnected, and publishes to retry, in their order.
    const waiting = [...this.#requests.values()].filter((q) => !q.sent || q.retry);
    waiting.sort((a, b) => a.frame.id - b.frame.id);
    for (const q of waiting) {
      q.sent = true;
      this.#send(q.frame);
    }
  }

  #onMessage(ws: WebSocket, data: ArrayBuffer | string): void {
    if (ws !== this.#ws) return;
    this.#heard = now();
    let frames: ServerFrame[];
    try {
      frames = this.#codec.decode(data);
    } catch (e) {
      this.emit("error", new GatewayError(0, `undecodable message: ${e}`, false));
      return this.#drop(ws, 1007, "undecodable message");
    }
    for (const f of frames) {
      if (f.id > 0) {
        const req = this.#requests.get(f.id);
        if (req && req.onReply(f)) {
          clearTimeout(req.timer);
          this.#requests.delete(f.id);
        }
        continue;
      }
      const b = f.body;
      switch (b.case) {
        case "publication":
          this.#subs.get(b.value.channel)?.publication(b.value);
          break;
        case "join":
          this.#subs.get(b.value.channel)?.presence("join", b.value.info);
          break;
        case "leave":
          this.#subs.get(b.value.channel)?.presence("leave", b.value.info);
          break;
        case "reset":
          this.#subs.get(b.value.channel)?.reset(b.value.epoch);
          break;
        case "disconnect":
          this.#serverCode = { code: b.value.code, reason: b.value.reason };
          break;
      }
    }
  }

  /** Pings when the connection has been quiet; drops it when the ping gets no answer. */
  #watch(ws: WebSocket): void {
    clearInterval(this.#pinger);
    const tick = Math.max(100, Math.min(this.#o.pingIntervalMs, this.#o.pingTimeoutMs) / 4);
    this.#pinger = setInterval(() => {
      if (ws !== this.#ws) return clearInterval(this.#pinger);
      const t = now();
      // Opening, fetching a token, or waiting for the Connect reply: all within one bound,
      // or the connection counts as dropped (a proxy that accepts and says nothing).
      if (this.#state !== "connected") {
        if (t - this.#openedAt > this.#o.requestTimeoutMs / 3) this.#drop(ws, 1006, "connect timed out");
        return;
      }
      if (this.#pingSent > this.#heard) {
        if (t - this.#pingSent > this.#o.pingTimeoutMs) this.#drop(ws, 4004, "no answer to ping");
        return;
      }
      if (t - this.#heard >= this.#o.pingIntervalMs && this.#state === "connected") {
        this.#pingSent = t;
        // With an id, so the server answers (the answer itself is not tracked).
        this.#send(frame(this.#id(), { case: "ping", value: create(PingSchema, {}) }));
      }
    }, tick);
  }

  /** Gives up on a connection that cannot be trusted (dead link, bad data). */
  #drop(ws: WebSocket, code: number, reason: string): void {
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close();
    } catch {
      /* already closing */
    }
    this.#closed(ws, code, reason);
  }

  #closed(ws: WebSocket, code: number, reason: string): void {
    if (ws !== this.#ws) return;
    this.#ws = undefined;
    clearInterval(this.#pinger);
    const why = this.#serverCode ?? { code, reason };
    this.session = undefined;
    for (const sub of this.#subs.values()) sub.disconnected();
    let reaction = closeReaction(why.code);
    const refreshedLately = now() - this.#refreshed < 5_000;
    if (reaction.kind === "refresh-token") {
      this.#token = undefined;
      this.#refreshed = now();
      if (!this.#o.getToken) reaction = { kind: "stop" };
    }
    if (this.#stopped || reaction.kind === "stop") {
      this.#stopped = true;
      this.#failAll(new GatewayError(0, `closed (${why.code} ${why.reason})`, false), true);
      this.#setState("closed");
      this.emit("disconnected", { ...why, reconnectInMs: null });
      return;
    }
    this.#failAll(new GatewayError(0, `connection dropped (${why.code})`, true), false);
    let delay: number;
    if (reaction.kind === "spread") delay = Math.floor(Math.random() * reaction.spreadMs);
    else if (reaction.kind === "refresh-token" && !refreshedLately) delay = 0;
    else {
      // A floor (1013, 4029) plus the jittered delay: clients refused together do not
      // come back together.
      const floor = reaction.kind === "backoff" ? reaction.minMs : 0;
      delay = floor + backoffDelay(this.#attempt++, this.#backoff());
    }
    this.#setState("disconnected");
    this.emit("disconnected", { ...why, reconnectInMs: delay });
    this.#reconnect = setTimeout(() => this.#open(), delay);
  }

  #backoff(): Backoff {
    return this.#o.backoff ?? DEFAULT_BACKOFF;
  }

  /** Fails the commands that cannot outlive the connection (all, if `everything`). */
  #failAll(err: GatewayError, everything: boolean): void {
    for (const [id, req] of this.#requests) {
      if (!everything && req.sent === false && !req.live) continue; // still queued
      if (!everything && req.retry) {
        req.sent = false; // sent again on the next connection
        continue;
      }
      clearTimeout(req.timer);
      this.#requests.delete(id);
      req.reject(err);
    }
    this.#outgoing = [];
  }
}

interface Link {
  send(sub: Subscription): void;
  unsubscribe(sub: Subscription): void;
  resubscribe(sub: Subscription): void;
  history(since: bigint, limit: number): Promise<{ publications: Publication[]; epoch: string }>;
}

/** Live publications a subscription holds at most while it catches up. */
const MAX_HELD = 10_000;

/** A channel subscription: delivers each publication once, in order, across reconnects. */
export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  readonly client: Client;
  #link: Link;
  #pos = new Position();
  #recoverable = true;
  #history: number;
  /** Live publications held while history is being fetched or a gap recovered. */
  #held: Publication[] | undefined;
  #everSubscribed = false;
  #active = true;
  /** @internal Subscribe attempts that failed temporarily in a row. */
  retries = 0;
  /** @internal Where the subscription token comes from, if any. */
  readonly tokenSource: SubscribeOptions["token"];

  constructor(client: Client, channel: string, options: SubscribeOptions, link: Link) {
    super();
    this.client = client;
    this.channel = channel;
    this.#link = link;
    this.#history = options.history ?? 0;
    this.tokenSource = options.token;
    if (options.since) this.#pos.set(options.since.epoch, options.since.offset);
  }

  /** Where the subscription is: save it to resume later (`subscribe(…, { since })`). */
  get position(): { epoch: string; offset: bigint } {
    return { epoch: this.#pos.epoch, offset: this.#pos.offset };
  }

  unsubscribe(): void {
    if (!this.#active) return;
    this.#active = false;
    this.#link.unsubscribe(this);
  }

  /** @internal What to ask for when (re)subscribing. */
  recoverFrom(): { recover: boolean; offset: bigint; epoch: string } {
    const recover = this.#pos.known && this.#recoverable;
    return recover
      ? { recover, offset: this.#pos.offset, epoch: this.#pos.epoch }
      : { recover: false, offset: 0n, epoch: "" };
  }

  /** @internal */
  subscribed(r: SubscribeResult): void {
    const asked = this.recoverFrom();
    const resubscribed = this.#everSubscribed;
    this.#everSubscribed = true;
    this.retries = 0;
    this.#recoverable = r.recoverable;
    this.#held = undefined;
    if (asked.recover && r.recovered) {
      for (const p of r.publications) this.publication(p);
    } else if (asked.recover) {
      this.#pos.set(r.epoch, r.offset);
      this.emit("reset", { reason: "recovery-failed", epoch: r.epoch });
    } else {
      this.#pos.set(r.epoch, r.offset);
    }
    this.emit("subscribed", { epoch: r.epoch, offset: r.offset, recovered: asked.recover && r.recovered, resubscribed });
    if (!resubscribed && !asked.recover && this.#history > 0 && r.recoverable) void this.#backfill(r);
  }

  /** Delivers up to `history` publications before the subscribe position, then what
   * arrived live meanwhile. */
  async #backfill(r: SubscribeResult): Promise<void> {
    this.#held = [];
    const since = r.offset > BigInt(this.#history) ? r.offset - BigInt(this.#history) : 0n;
    try {
      const page = await this.#link.history(since, this.#history);
      if (page.epoch === r.epoch) {
        for (const p of page.publications) if (p.offset <= r.offset) this.emit("publication", p);
      }
    } catch (e) {
      if (e instanceof GatewayError) this.emit("error", e);
    }
    const held = this.#held ?? [];
    this.#held = undefined;
    for (const p of held) this.publication(p);
  }

  /** @internal */
  failed(e: GatewayError): void {
    this.emit("error", e);
  }

  /** @internal */
  publication(p: Publication): void {
    if (this.#held) {
      // Bounded: what is not held is recovered after the position anyway.
      if (this.#held.length < MAX_HELD) this.#held.push(p);
      return;
    }
    switch (this.#pos.accept(p.epoch, p.offset)) {
      case "duplicate":
        return;
      case "gap":
        // Something went missing: recover from the last publication delivered.
        this.#held = [];
        this.#link.resubscribe(this);
        return;
      case "epoch":
        this.emit("reset", { reason: "epoch", epoch: p.epoch });
        break;
    }
    this.emit("publication", p);
  }

  /** @internal */
  reset(epoch: string): void {
    this.#pos.reset(epoch);
    this.emit("reset", { reason: "epoch", epoch });
  }

  /** @internal */
  presence(kind: "join" | "leave", info: ClientInfo | undefined): void {
    if (info) this.emit(kind, info);
  }

  /** @internal */
  disconnected(): void {
    // Held publications are dropped: recovery on the next subscribe brings them again.
    if (this.#held) this.#held = undefined;
  }
}

// Bun's native pub/sub (uWebSockets' topic tree: `ws.subscribe`, `server.publish`) speaking
// the subset of gateway.v1.proto that `loadgen` uses, so one load generator drives both:
//
//   subscribe -> SubscribeResult{offset: the channel's last offset}
//   publish   -> PublishResult{offset}, and one Publication{channel, offset, data,
//                time_unix_ms} encoded once and handed to server.publish()
//
// Frames are varint-length-delimited protobuf messages, several per WebSocket message
// (DESIGN.md, wire protocol). No auth, no history, no presence: the peer is the floor a
// single process without a broker can reach, which is what the gateway is measured against.
//
// Usage: bun server.ts [port]   (WebSocket at /ws, subprotocol gateway.v1.proto)

import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { BinaryReader, BinaryWriter } from "@bufbuild/protobuf/wire";
import {
  ClientFrameSchema,
  ServerFrameSchema,
  type ServerFrame,
} from "../../../gateway/web/src/gen/gateway/v1/gateway_pb.ts";

const port = Number(process.argv[2] ?? 18090);
const SUBPROTOCOL = "gateway.v1.proto";
const offsets = new Map<string, bigint>();

function delimited(frames: ServerFrame[]): Uint8Array {
  const w = new BinaryWriter();
  for (const f of frames) w.bytes(toBinary(ServerFrameSchema, f));
  return w.finish();
}

const server = Bun.serve({
  port,
  hostname: "127.0.0.1",
  fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname !== "/ws") return new Response("not found", { status: 404 });
    const asked = req.headers.get("sec-websocket-protocol") ?? "";
    if (!asked.split(",").some((p) => p.trim() === SUBPROTOCOL)) {
      return new Response("subprotocol gateway.v1.proto required", { status: 400 });
    }
    const headers = { "Sec-WebSocket-Protocol": SUBPROTOCOL };
    if (server.upgrade(req, { headers })) return undefined;
    return new Response("upgrade failed", { status: 400 });
  },
  websocket: {
    // The same bounds the gateway's defaults use: 1 MiB messages, no compression.
    maxPayloadLength: 1 << 20,
    perMessageDeflate: false,
    idleTimeout: 120,
    message(ws, message) {
      if (typeof message === "string") {
        ws.close(1003, "binary frames only");
        return;
      }
      const replies: ServerFrame[] = [];
      const r = new BinaryReader(message);
      while (r.pos < r.len) {
        const frame = fromBinary(ClientFrameSchema, r.bytes());
        const cmd = frame.command;
        if (cmd.case === "subscribe") {
          const channel = cmd.value.channel;
          ws.subscribe(channel);
          replies.push(
            create(ServerFrameSchema, {
              id: frame.id,
              body: { case: "subscribe", value: { offset: offsets.get(channel) ?? 0n } },
            }),
          );
        } else if (cmd.case === "publish") {
          const channel = cmd.value.channel;
          const offset = (offsets.get(channel) ?? 0n) + 1n;
          offsets.set(channel, offset);
          const push = create(ServerFrameSchema, {
            body: {
              case: "publication",
              value: { channel, offset, data: cmd.value.data, timeUnixMs: BigInt(Date.now()) },
            },
          });
          server.publish(channel, delimited([push]));
          replies.push(
            create(ServerFrameSchema, { id: frame.id, body: { case: "publish", value: { offset } } }),
          );
        } else {
          replies.push(
            create(ServerFrameSchema, {
              id: frame.id,
              error: { code: 104, message: "not supported by this peer" },
            }),
          );
        }
      }
      if (replies.length > 0) ws.sendBinary(delimited(replies));
    },
  },
});

console.log(`bun ${Bun.version} pub/sub peer listening on ws://127.0.0.1:${server.port}/ws`);

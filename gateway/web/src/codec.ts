/** How frames travel: the binary encoding (`gateway.v1.proto`, frames prefixed by their
 * length as a varint) built in; the JSON one is a separate import (`./json`). */
import { create, fromBinary } from "@bufbuild/protobuf";
import { sizeDelimitedEncode, sizeDelimitedPeek } from "@bufbuild/protobuf/wire";
import {
  type ClientFrame,
  ClientFrameSchema,
  type ServerFrame,
  ServerFrameSchema,
} from "./gen/gateway/v1/gateway_pb.js";

export interface Codec {
  /** The WebSocket subprotocol that selects this encoding. */
  subprotocol: string;
  encode(frames: ClientFrame[]): Uint8Array | string;
  decode(data: ArrayBuffer | string): ServerFrame[];
}

export const protoCodec: Codec = {
  subprotocol: "gateway.v1.proto",
  encode(frames) {
    const parts = frames.map((f) => sizeDelimitedEncode(ClientFrameSchema, f));
    if (parts.length === 1) return parts[0];
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  },
  decode(data) {
    if (typeof data === "string") throw new Error("text message on the binary encoding");
    let bytes = new Uint8Array(data);
    const frames: ServerFrame[] = [];
    while (bytes.length > 0) {
      const peek = sizeDelimitedPeek(bytes);
      if (peek.eof || peek.offset + peek.size > bytes.length) throw new Error("truncated frame");
      frames.push(fromBinary(ServerFrameSchema, bytes.subarray(peek.offset, peek.offset + peek.size)));
      bytes = bytes.subarray(peek.offset + peek.size);
    }
    return frames;
  },
};

/** A frame with a command, for the codecs' users. */
export function frame(id: number, command: ClientFrame["command"]): ClientFrame {
  return create(ClientFrameSchema, { id, command });
}

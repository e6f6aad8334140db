/** The JSON encoding (`gateway.v1.json`): frames in the proto3 JSON mapping, one per line.
 * For tools and debugging; a separate import so the binary client stays small:
 * `new Client(url, { codec: jsonCodec })`. */
import { fromJsonString, toJsonString } from "@bufbuild/protobuf";
import type { Codec } from "./codec.js";
import { ClientFrameSchema, ServerFrameSchema } from "./gen/gateway/v1/gateway_pb.js";

export const jsonCodec: Codec = {
  subprotocol: "gateway.v1.json",
  encode(frames) {
    return frames.map((f) => toJsonString(ClientFrameSchema, f)).join("\n");
  },
  decode(data) {
    const text = typeof data === "string" ? data : new TextDecoder().decode(data);
    return text
      .split("\n")
      .filter((line) => line.length > 0)
      .map((line) => fromJsonString(ServerFrameSchema, line, { ignoreUnknownFields: true }));
  },
};

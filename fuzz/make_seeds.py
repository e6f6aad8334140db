#!/usr/bin/env python3
"""Writes the committed seed corpora in fuzz/seeds/<target>/ (standard library only).

Each seed is a valid or nearly valid input of its target, so the fuzzer starts from the
shapes the parsers accept and mutates from there. Run from anywhere; rerunning rewrites
the same files.
"""
import base64, hashlib, hmac, json, os, struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def msg(num, *parts):
    return field(num, 2, b"".join(parts))


def s(num, text):
    return field(num, 2, text.encode() if isinstance(text, str) else text)


def frame(fid, command):
    return field(1, 0, fid) + command


def delimited(*frames):
    # A binary WebSocket message carries length-delimited ClientFrames.
    return b"".join(varint(len(f)) + f for f in frames)


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


proto = {
    "connect": frame(1, msg(2, s(1, "tok"), s(2, "alice"), s(3, "1.0"))),
    "subscribe": frame(2, msg(3, s(1, "chat:room"), field(2, 0, 1), field(3, 0, 7), s(4, "ep"), s(5, "t"))),
    "unsubscribe": frame(3, msg(4, s(1, "chat:room"))),
    "publish": frame(4, msg(5, s(1, "room"), s(2, b"\x00hi"), s(3, "text/plain"), s(4, "k1"),
                            msg(5, s(1, "ab" * 32), field(2, 0, 10)))),
    "presence": frame(5, msg(6, s(1, "room"))),
    "history": frame(6, msg(7, s(1, "room"), field(2, 0, 3), field(3, 0, 10))),
    "ping": frame(7, msg(8)),
    "blob_put": frame(8, msg(9, field(1, 0, 1), s(2, "room"), s(3, "image/png"), field(4, 0, 8),
                             s(5, b"\x89PNG\r\n\x1a\n"), field(6, 0, 1))),
    "blob_get": frame(9, msg(10, s(1, "ab" * 32), s(2, "room"))),
    "rpc": frame(10, msg(11, s(1, "slice"), s(2, b"{}"), s(3, "application/json"))),
}
for name, f in proto.items():
    write("frames_proto", name, delimited(f))
write("frames_proto", "batch", delimited(*proto.values()))

json_frames = [
    '{"id":1,"connect":{"token":"t","name":"a"}}',
    '{"id":2,"subscribe":{"channel":"room","recover":true,"offset":"3","epoch":"e"}}',
    '{"id":2,"subscribe":{"channel":"room","epoch":null}}',
    '{"id":3,"publish":{"channel":"room","data":"aGk=","contentType":"text/plain","idempotencyKey":"k"}}',
    '{"id":4,"history":{"channel":"room","sinceOffset":"1","limit":5}}',
    '{"id":5,"presence":{"channel":"room"}}',
    '{"id":6,"ping":{}}',
    '{"id":7,"blobPut":{"upload":1,"channel":"room","contentType":"image/png","size":"8","data":"iVBORw0KGgo=","last":true}}',
    '{"id":8,"blobGet":{"id":"' + "ab" * 32 + '","channel":"room"}}',
    '{"id":9,"rpc":{"method":"m","data":"e30=","contentType":"application/json"}}',
    '{"id":10,"futureCommand":{"x":1}}',
]
for i, f in enumerate(json_frames):
    write("frames_json", f"frame{i}", f)
write("frames_json", "batch", "\n".join(json_frames))

api = {
    "publish": 'POST /api/v1/publish\n{"channel":"room","data":"aGk=","contentType":"text/plain"}',
    "broadcast": 'POST /api/v1/broadcast\n{"channels":["a","b"],"data":"aGk=","idempotencyKey":"k"}',
    "disconnect": 'POST /api/v1/disconnect\n{"user":"alice"}',
    "nodes": "GET /api/v1/nodes\n",
    "history": "GET /api/v1/channels/chat%3A%23alice/history?since_offset=3&limit=10\n",
    "presence": "GET /api/v1/channels/room/presence\n",
    "blobs": "POST /api/v1/blobs?channel=room\n",
    "blob_ref": 'POST /api/v1/publish\n{"channel":"room","blobs":[{"id":"' + "ab" * 32 + '","name":"x.png"}]}',
}
for name, text in api.items():
    write("api_request", name, text)

# blob_upload: ops of (op, upload id, args...). begin = 0 + u16 size/2; feed = 1 + len;
# last chunk = 2 + len; abandon = 3; expire tick = 4.
blob = {
    "one_upload": bytes([0, 1]) + struct.pack("<H", 50) + bytes([2, 1, 100]) + b"\x89PNG" * 25,
    "chunks": bytes([0, 2]) + struct.pack("<H", 3000) + (bytes([1, 2, 64]) + b"x" * 64) * 10
    + bytes([2, 2, 10]) + b"y" * 10,
    "abandon_expire": bytes([0, 3]) + struct.pack("<H", 10) + bytes([3, 3, 4, 0]) + bytes([0, 4])
    + struct.pack("<H", 10) + bytes([4, 0, 1, 4, 5]) + b"abcde",
    "many": b"".join(bytes([0, i]) + struct.pack("<H", 100) for i in range(8)),
}
for name, data in blob.items():
    write("blob_upload", name, data)


def b64(x):
    return base64.urlsafe_b64encode(x).rstrip(b"=")


def jwt(claims, secret=b"fuzz-secret", header=None):
    h = b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    p = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, h + b"." + p, hashlib.sha256).digest())
    return h + b"." + p + b"." + sig


tokens = {
    "good": jwt({"sub": "alice", "aud": "gw", "exp": 4000000000}),
    "claims": jwt({"sub": "alice", "aud": ["gw"], "channels": ["news", "chat:#alice"],
                   "grants": ["chat:*"], "nbf": 0, "iat": 1}),
    "subscription": jwt({"sub": "alice", "aud": "gw", "channel": "chat:room"}),
    "none_alg": jwt({"sub": "alice"}, header={"alg": "none"}),
    "kid": jwt({"sub": "alice"}, header={"alg": "RS256", "kid": "k1"}),
}
for name, t in tokens.items():
    write("token", name, b"\x00" + t)
# Odd mode bytes: the claims are signed by the target itself.
write("token", "raw_claims", b"\x01" + json.dumps({"sub": "a", "aud": "gw", "channels": ["x"]}).encode())
write("token", "raw_grants", b"\x01" + json.dumps({"sub": "a", "aud": "gw", "grants": ["*"], "iat": 99}).encode())


# ws_decode: a read-size byte, then client frames (masked).
def ws_frame(first, payload, masked=True):
    n = len(payload)
    if n < 126:
        head = bytes([first, (0x80 if masked else 0) | n])
    elif n < 65536:
        head = bytes([first, (0x80 if masked else 0) | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, (0x80 if masked else 0) | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = b"\x37\xfa\x21\x3d"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


write("ws_decode", "binary", b"\x07" + ws_frame(0x82, b"hello"))
write("ws_decode", "fragments_and_ping", b"\x03" + ws_frame(0x01, "fr".encode()) + ws_frame(0x89, b"p")
      + ws_frame(0x00, "agmenté".encode()) + ws_frame(0x80, b""))
write("ws_decode", "close", b"\x05" + ws_frame(0x88, (1000).to_bytes(2, "big") + b"bye"))
write("ws_decode", "medium", b"\x20" + ws_frame(0x82, bytes(range(256)) * 2))
write("ws_decode", "unmasked", b"\x01" + ws_frame(0x82, b"x", masked=False))
write("ws_decode", "utf8_split", b"\x01" + ws_frame(0x01, "é".encode()[:1]) + ws_frame(0x80, "é".encode()[1:]))

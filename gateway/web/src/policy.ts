/** What a client does when its connection closes, by close code (DESIGN.md's table). */
export type Reaction =
  /** Do not reconnect: the server or the app ended it for good. */
  | { kind: "stop" }
  /** Get a fresh token (`getToken`), then reconnect at once. */
  | { kind: "refresh-token" }
  /** Reconnect after a backoff delay no shorter than `minMs`. */
  | { kind: "backoff"; minMs: number }
  /** Reconnect after a random delay within `spreadMs` (a draining node: spread the load). */
  | { kind: "spread"; spreadMs: number };

const STOP = new Set([1000, 1002, 1003, 1007, 1008, 1009, 4000]);

export function closeReaction(code: number): Reaction {
  if (STOP.has(code)) return { kind: "stop" };
  switch (code) {
    case 4001: // token invalid: a new one may be valid (getToken); without it, stop
    case 4003: // token expired
      return { kind: "refresh-token" };
    case 1012: // node draining or restarting
      return { kind: "spread", spreadMs: 5_000 };
    case 1013: // node over capacity: try elsewhere, but not at once
    case 4029: // rate limited repeatedly
      return { kind: "backoff", minMs: 5_000 };
    default: // 1001, 1006 (dropped), 1011, 4004, 4008 and anything unknown
      return { kind: "backoff", minMs: 0 };
  }
}

/** Error codes worth retrying the same command for (DESIGN.md: temporary). */
export function isTemporary(code: number, temporary: boolean): boolean {
  return temporary || code === 100 || code === 107 || code === 108;
}

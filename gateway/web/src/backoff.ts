/** Reconnect delays: exponential with full jitter (a uniform delay between 0 and the
 * exponential cap), so clients dropped together do not come back together. */
export interface Backoff {
  /** The cap of the first attempt, in ms. */
  minMs: number;
  /** The largest cap, in ms. */
  maxMs: number;
}

export const DEFAULT_BACKOFF: Backoff = { minMs: 500, maxMs: 20_000 };

/** The delay before reconnect attempt `attempt` (0 for the first). */
export function backoffDelay(attempt: number, b: Backoff, random: () => number = Math.random): number {
  const cap = Math.min(b.maxMs, b.minMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

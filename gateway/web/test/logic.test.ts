// Unit tests of the client's pure logic (run with `npm test`: bundled by esbuild, then
// `node --test`).
import assert from "node:assert/strict";
import { test } from "node:test";
import { backoffDelay } from "../src/backoff.ts";
import { Latest } from "../src/latest.ts";
import { closeReaction } from "../src/policy.ts";
import { Position } from "../src/position.ts";

test("backoff: full jitter under an exponential cap", () => {
  const b = { minMs: 500, maxMs: 20_000 };
  assert.equal(backoffDelay(0, b, () => 0.999999), 499);
  assert.equal(backoffDelay(3, b, () => 0.5), 2_000);
  assert.equal(backoffDelay(10, b, () => 0.999999), 19_999, "capped");
  assert.equal(backoffDelay(1000, b, () => 0.5), 10_000, "no overflow");
  assert.equal(backoffDelay(5, b, () => 0), 0, "the whole range, from zero");
});

test("close codes: stop, refresh the token, back off, or spread", () => {
  for (const code of [1000, 1002, 1003, 1007, 1008, 1009, 4000]) {
    assert.deepEqual(closeReaction(code), { kind: "stop" }, `${code}`);
  }
  assert.deepEqual(closeReaction(4003), { kind: "refresh-token" });
  // A bad token may be replaced by getToken (DESIGN.md: "get a new token").
  assert.deepEqual(closeReaction(4001), { kind: "refresh-token" });
  assert.deepEqual(closeReaction(1012), { kind: "spread", spreadMs: 5_000 });
  assert.deepEqual(closeReaction(1013), { kind: "backoff", minMs: 5_000 });
  assert.deepEqual(closeReaction(4029), { kind: "backoff", minMs: 5_000 });
  for (const code of [1001, 1006, 1011, 4004, 4008, 4999]) {
    assert.deepEqual(closeReaction(code), { kind: "backoff", minMs: 0 }, `${code}`);
  }
});

test("position: in order once, duplicates dropped, gaps and new epochs flagged", () => {
  const p = new Position();
  assert.equal(p.accept("e1", 5n), "deliver", "the first sets the place");
  assert.equal(p.accept("e1", 6n), "deliver");
  assert.equal(p.accept("e1", 6n), "duplicate");
  assert.equal(p.accept("e1", 3n), "duplicate");
  assert.equal(p.accept("e1", 9n), "gap");
  assert.equal(p.offset, 6n, "a gap does not move the place");
  assert.equal(p.accept("e2", 1n), "epoch");
  assert.deepEqual([p.epoch, p.offset], ["e2", 1n]);
  p.reset("e3");
  assert.equal(p.accept("e3", 1n), "deliver", "after a reset the new epoch starts at 1");
  assert.equal(p.accept("e3", 0n), "deliver", "no history: no order to keep");
});

test("latest: one call in flight, one waiting, stale ones dropped", async () => {
  const started: number[] = [];
  const finish: Array<() => void> = [];
  const latest = new Latest<number, number>(
    (n) =>
      new Promise((resolve) => {
        started.push(n);
        finish.push(() => resolve(n * 10));
      }),
  );
  const results = [1, 2, 3, 4].map((n) => latest.run(n));
  assert.equal(latest.pending, 2);
  assert.deepEqual(started, [1], "one in flight");
  finish.shift()!();
  assert.equal(await results[0], 10);
  assert.equal(await results[1], undefined, "replaced while waiting");
  assert.equal(await results[2], undefined);
  await new Promise((r) => setTimeout(r, 0));
  assert.deepEqual(started, [1, 4], "only the newest waiting one runs");
  finish.shift()!();
  assert.equal(await results[3], 40);
  assert.equal(latest.pending, 0);
});

/** A subscription's place in its channel's stream: the last (epoch, offset) delivered. */
export type Verdict =
  /** New and next in order: deliver it. */
  | "deliver"
  /** Seen already (a recovery overlapping live delivery): drop it. */
  | "duplicate"
  /** Offsets skipped: publications are missing; recover before going on. */
  | "gap"
  /** Another epoch: the stream restarted; the app should reload (then it is delivered). */
  | "epoch";

export class Position {
  epoch = "";
  offset = 0n;
  /** Whether epoch and offset mean anything yet. */
  known = false;

  /** Judges a publication and, unless it is a duplicate or beyond a gap, moves past it. */
  accept(epoch: string, offset: bigint): Verdict {
    if (offset === 0n) return "deliver"; // a channel without history: no order to keep
    if (this.known && epoch === this.epoch) {
      if (offset <= this.offset) return "duplicate";
      if (offset > this.offset + 1n) return "gap";
    }
    const changed = this.known && epoch !== this.epoch;
    this.epoch = epoch;
    this.offset = offset;
    this.known = true;
    return changed ? "epoch" : "deliver";
  }

  /** The stream restarted under `epoch`: its publications follow from offset 1. */
  reset(epoch: string): void {
    this.epoch = epoch;
    this.offset = 0n;
    this.known = true;
  }

  set(epoch: string, offset: bigint): void {
    this.epoch = epoch;
    this.offset = offset;
    this.known = true;
  }
}

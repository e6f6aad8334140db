/** At most one call in flight and one waiting: a newer request replaces the waiting one
 * (which resolves `undefined`), so a fast slider never queues stale work. */
export class Latest<I, O> {
  #call: (input: I) => Promise<O>;
  #busy = false;
  #waiting: { input: I; resolve: (o: O | undefined) => void; reject: (e: unknown) => void } | undefined;

  constructor(call: (input: I) => Promise<O>) {
    this.#call = call;
  }

  /** Calls now, or after the call in flight; `undefined` when a newer request came. */
  run(input: I): Promise<O | undefined> {
    return new Promise((resolve, reject) => {
      if (!this.#busy) return this.#start(input, resolve, reject);
      this.#waiting?.resolve(undefined);
      this.#waiting = { input, resolve, reject };
    });
  }

  /** Calls in flight or waiting (at most 2). */
  get pending(): number {
    return (this.#busy ? 1 : 0) + (this.#waiting ? 1 : 0);
  }

  #start(input: I, resolve: (o: O | undefined) => void, reject: (e: unknown) => void): void {
    this.#busy = true;
    this.#call(input).then(
      (o) => (this.#next(), resolve(o)),
      (e) => (this.#next(), reject(e)),
    );
  }

  /** The call in flight ended: the waiting one (if any) goes next. */
  #next(): void {
    this.#busy = false;
    const next = this.#waiting;
    this.#waiting = undefined;
    if (next) this.#start(next.input, next.resolve, next.reject);
  }
}

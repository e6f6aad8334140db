/** A small typed event emitter: `on` returns the function that removes the handler. */
export class Emitter<Events extends object> {
  #handlers = new Map<keyof Events, Set<(value: never) => void>>();

  on<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): () => void {
    let set = this.#handlers.get(event);
    if (!set) this.#handlers.set(event, (set = new Set()));
    set.add(handler as (value: never) => void);
    return () => this.off(event, handler);
  }

  off<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): void {
    this.#handlers.get(event)?.delete(handler as (value: never) => void);
  }

  protected emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const h of this.#handlers.get(event) ?? []) {
      try {
        (h as (value: Events[K]) => void)(value);
      } catch (e) {
        console.error(`gateway client: a ${String(event)} handler threw`, e);
      }
    }
  }
}

/** Runs async tasks one at a time, in the order they were queued (a card or PSAM handles one APDU at a time). */
export class Mutex {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(task: () => Promise<T>): Promise<T> {
    const result = this.tail.then(task, task);
    this.tail = result.catch(() => undefined);
    return result;
  }
}

/**
 * One Mutex per key, made on first use and dropped when its queue is empty:
 * the steps of one transaction run one at a time, whoever asks, while
 * different transactions run side by side.
 */
export class KeyedMutex {
  private readonly tails = new Map<string, Promise<unknown>>();

  run<T>(key: string, task: () => Promise<T>): Promise<T> {
    const result = (this.tails.get(key) ?? Promise.resolve()).then(task, task);
    const tail: Promise<void> = result.then(
      () => this.forget(key, tail),
      () => this.forget(key, tail),
    );
    this.tails.set(key, tail);
    return result;
  }

  /**
   * Runs `task` at once if no task of `key` is running or queued, else runs
   * nothing: `{ ran: false }`. For work that someone else busy with the key
   * makes needless (a sweep skips what a request is handling).
   */
  tryRun<T>(key: string, task: () => Promise<T>): Promise<{ ran: true; value: T } | { ran: false }> {
    if (this.busy(key)) return Promise.resolve({ ran: false });
    return this.run(key, async () => ({ ran: true, value: await task() }));
  }

  /** Whether a task of `key` is running or queued. */
  busy(key: string): boolean {
    return this.tails.has(key);
  }

  /** Keys with a task running or queued (for tests and operators). */
  get size(): number {
    return this.tails.size;
  }

  private forget(key: string, tail: Promise<unknown>): void {
    if (this.tails.get(key) === tail) this.tails.delete(key);
  }
}

/**
 * An async-iterable queue: producers push, one consumer iterates. Used to
 * feed the outgoing side of a bidirectional gRPC stream from event handlers.
 */
export class AsyncQueue<T> implements AsyncIterable<T> {
  private items: T[] = [];
  private waiting: ((r: IteratorResult<T>) => void) | undefined;
  private failWaiting: ((e: Error) => void) | undefined;
  private ended = false;
  private error: Error | undefined;

  get closed(): boolean {
    return this.ended;
  }

  get length(): number {
    return this.items.length;
  }

  push(item: T): boolean {
    if (this.ended) return false;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = this.failWaiting = undefined;
      w({ value: item, done: false });
    } else {
      this.items.push(item);
    }
    return true;
  }

  /** Ends the queue; the consumer drains what is queued, then ends (or throws `error`). */
  close(error?: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.error = error;
    if (this.waiting) {
      const [w, f] = [this.waiting, this.failWaiting];
      this.waiting = this.failWaiting = undefined;
      if (error !== undefined) f!(error);
      else w({ value: undefined, done: true });
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return {
      next: () => {
        if (this.items.length) return Promise.resolve({ value: this.items.shift()!, done: false });
        if (this.ended) return this.error !== undefined ? Promise.reject(this.error) : Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => {
          this.waiting = resolve;
          this.failWaiting = reject;
        });
      },
      return: async () => {
        this.close();
        this.items = [];
        return { value: undefined, done: true };
      },
    };
  }
}

// A map that keeps only its latest entries: for caches an outside caller can
// fill (transaction ids, PSAM ids), which must not grow without end.

export class BoundedMap<K, V> {
  private readonly entries = new Map<K, V>();

  constructor(private readonly max: number) {}

  get(key: K): V | undefined {
    return this.entries.get(key);
  }

  /** Adds or replaces an entry; the oldest entry makes room when full. */
  set(key: K, value: V): void {
    if (!this.entries.has(key) && this.entries.size >= this.max) {
      const oldest = this.entries.keys().next();
      if (!oldest.done) this.entries.delete(oldest.value);
    }
    this.entries.set(key, value);
  }

  get size(): number {
    return this.entries.size;
  }
}

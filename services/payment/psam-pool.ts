// The payment server's view of its PSAMs (the patent's terminal interface
// 230): which PSAMs exist and are free, and which transaction gets which PSAM
// within the caller's deadline. Pure logic: no gRPC and no I/O, so it is
// tested with plain objects and a model clock (test/unit/psam-pool.test.ts).
// The stream that feeds it is concentrator-link.ts.
//
// The allocation rule:
//   - A request is served at once by the least recently used free PSAM it
//     can use (currency, key version, not a PSAM it excluded; or the one PSAM
//     it names by key), unless an earlier waiter could use that same PSAM.
//   - Waiters are served in arrival order, each with the least recently used
//     free PSAM it can use. A waiter never blocks a request it does not
//     compete with for a free PSAM.
//   - The queue is served again whenever a PSAM becomes free or appears
//     (release, terminal update, slot update) and whenever a waiter leaves.
//   - At most `maxWaiters` requests wait; beyond that, acquire fails at once.
//   - A request that no PSAM in the pool could ever serve fails at once: no
//     PSAM at all (no terminal attached), or none with its currency or key
//     version. Only a pool with PSAMs that are busy makes it wait. A request
//     already waiting when the pool empties waits on until its deadline, as
//     does one marked `waitWhenEmpty` (a transaction whose PSAM was just lost
//     with its terminal, which usually comes back at once).

/** A PSAM taken from the pool for one transaction. */
export interface Lease {
  terminalId: string;
  psamId: string;
  key: string;
  /** Which taking of the PSAM this is: a late release of an older lease must not free a newer one. */
  id: number;
  /** When it was taken (ms since the epoch, by the pool's clock). */
  takenAt: number;
}

/** One PSAM slot as the concentrator announces it, reduced to what allocation needs. */
export interface SlotInfo {
  /** The PSAM id, in hex. */
  psamId: string;
  /** Purchase key versions the PSAM holds. */
  keyVersions: readonly number[];
  /** ISO 4217 numeric currencies the PSAM accepts. */
  currencies: readonly number[];
  /** READY and not leased to another payment server, per the concentrator. */
  ready: boolean;
}

/** One terminal host and all its slots. */
export interface TerminalSlots {
  terminalId: string;
  slots: readonly SlotInfo[];
}

/** What a transaction needs from a PSAM. */
export interface Want {
  currency?: number;
  keyVersion?: number;
  /** A particular PSAM (to finish or reverse the debit it signed); currency, key version and exclusions are then ignored. */
  key?: string;
  /** PSAMs not to use (they already failed this transaction). */
  exclude?: ReadonlySet<string>;
  /** Wait for a PSAM to appear even when the pool has none now (instead of NoPsamFits "none"). */
  waitWhenEmpty?: boolean;
}

/** Time and timers, so that tests can run the pool on a model clock. */
export interface PoolClock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

const systemClock: PoolClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
};

export interface PsamPoolOptions {
  /** The most requests that may wait for a PSAM at once (default 1024). */
  maxWaiters?: number;
  clock?: PoolClock;
}

export const DEFAULT_MAX_WAITERS = 1024;

/** No PSAM became free for the request in time, or too many requests wait already. */
export class NoPsamFree extends Error {}

/** No PSAM in the pool could ever take the transaction: there is none at all, or none takes its currency or key version. */
export class NoPsamFits extends Error {
  constructor(
    readonly what: "none" | "currency" | "keyVersion",
    message: string,
  ) {
    super(message);
  }
}

interface PoolSlot {
  terminalId: string;
  psamId: string;
  keyVersions: readonly number[];
  currencies: readonly number[];
  /** READY and not leased to another payment server, per the concentrator. */
  available: boolean;
  /** The id of the lease holding the slot, or undefined when it is free here. */
  leaseId: number | undefined;
  /** When it was last leased, as a sequence number (0: never): the lower, the less recently used. */
  lastUsed: number;
}

interface Waiter {
  want: Want;
  resolve(l: Lease): void;
  reject(e: Error): void;
  timer: unknown;
}

/** The key under which the pool knows a PSAM: `terminalId/psamIdHex`. */
export const psamKey = (terminalId: string, psamId: string) => `${terminalId}/${psamId}`;

/** Whether a PSAM could serve a request, free or not. */
function suits(s: PoolSlot, key: string, w: Want): boolean {
  if (w.key !== undefined) return key === w.key;
  if (w.exclude?.has(key)) return false;
  if (w.currency !== undefined && !s.currencies.includes(w.currency)) return false;
  if (w.keyVersion !== undefined && !s.keyVersions.includes(w.keyVersion)) return false;
  return true;
}

const isFree = (s: PoolSlot) => s.available && s.leaseId === undefined;

/** Free PSAMs, handed out first come, first served, each to one transaction at a time. */
export class PsamPool {
  private readonly slots = new Map<string, PoolSlot>();
  /** In arrival order. */
  private waiters: Waiter[] = [];
  private leases = 0;
  private uses = 0;
  private readonly clock: PoolClock;
  private readonly maxWaiters: number;

  constructor(
    private readonly onRelease: (l: Lease) => void,
    o: PsamPoolOptions = {},
  ) {
    this.clock = o.clock ?? systemClock;
    this.maxWaiters = o.maxWaiters ?? DEFAULT_MAX_WAITERS;
  }

  /** Takes in the concentrator's view of one terminal: its slots replace the ones known before. */
  updateTerminal(t: TerminalSlots): void {
    const seen = new Set<string>();
    for (const s of t.slots) {
      const key = psamKey(t.terminalId, s.psamId);
      seen.add(key);
      const old = this.slots.get(key);
      this.slots.set(key, {
        terminalId: t.terminalId,
        psamId: s.psamId,
        keyVersions: [...s.keyVersions],
        currencies: [...s.currencies],
        available: s.ready,
        leaseId: old?.leaseId,
        lastUsed: old?.lastUsed ?? 0,
      });
    }
    for (const [k, s] of this.slots) if (s.terminalId === t.terminalId && !seen.has(k)) this.slots.delete(k);
    this.serveWaiters();
  }

  /** Takes in one slot's state from a job result (a PSAM we gave up on may be fine after all). */
  updateSlot(terminalId: string, slot: Pick<SlotInfo, "psamId" | "ready">): void {
    const s = this.slots.get(psamKey(terminalId, slot.psamId));
    if (!s) return;
    s.available = slot.ready;
    this.serveWaiters();
  }

  /** Forgets every terminal (the stream that told us about them ended); waiters keep waiting for the next announcement. */
  clear(): void {
    this.slots.clear();
  }

  /** Forgets one terminal's PSAMs; a later release of their leases does nothing. */
  removeTerminal(terminalId: string): void {
    for (const [k, s] of this.slots) if (s.terminalId === terminalId) this.slots.delete(k);
  }

  /** Takes a PSAM out of the pool until the terminal announces it again. */
  markFailed(l: Lease): void {
    const s = this.slots.get(l.key);
    if (s) s.available = false;
  }

  has(key: string): boolean {
    return this.slots.has(key);
  }

  /**
   * A PSAM for the request, first come, first served, until `deadline` (ms
   * since the epoch). Rejects with NoPsamFits at once when the pool has no
   * PSAM (unless `waitWhenEmpty`) or none that accepts its currency or key
   * version, and with NoPsamFree when the deadline passes or too many
   * requests wait already.
   */
  acquire(w: Want, deadline: number): Promise<Lease> {
    const misfit = this.misfit(w);
    if (misfit) return Promise.reject(misfit);
    const now = this.pickFor(w, (key, s) => !this.waiters.some((x) => suits(s, key, x.want)));
    if (now) return Promise.resolve(this.take(now));
    if (deadline <= this.clock.now()) return Promise.reject(new NoPsamFree(this.describeShortage(w)));
    if (this.waiters.length >= this.maxWaiters) {
      return Promise.reject(new NoPsamFree(`the queue for PSAMs is full (${this.maxWaiters} transactions wait already)`));
    }
    return new Promise((resolve, reject) => {
      const waiter: Waiter = { want: w, resolve, reject, timer: undefined };
      waiter.timer = this.clock.setTimeout(
        () => {
          if (!this.waiters.includes(waiter)) return;
          this.waiters = this.waiters.filter((x) => x !== waiter);
          reject(new NoPsamFree(this.describeShortage(w)));
          this.serveWaiters();
        },
        Math.min(2 ** 31 - 1, deadline - this.clock.now()),
      );
      this.waiters.push(waiter);
    });
  }

  /** Gives a PSAM back; does nothing for a lease that no longer holds it (released already, or the PSAM was forgotten since). */
  release(l: Lease): void {
    const s = this.slots.get(l.key);
    if (s?.leaseId !== l.id) return;
    s.leaseId = undefined;
    this.onRelease(l);
    this.serveWaiters();
  }

  /** For operators and tests: free (available, not leased), leased, and every PSAM known. */
  counts(): { free: number; leased: number; total: number } {
    let free = 0,
      leased = 0;
    for (const s of this.slots.values()) {
      if (s.leaseId !== undefined) leased++;
      else if (s.available) free++;
    }
    return { free, leased, total: this.slots.size };
  }

  /** How many requests wait for a PSAM. */
  waiting(): number {
    return this.waiters.length;
  }

  private misfit({ key, currency, keyVersion, waitWhenEmpty }: Want): NoPsamFits | undefined {
    if (key !== undefined) return undefined;
    if (this.slots.size === 0) return waitWhenEmpty ? undefined : new NoPsamFits("none", "no PSAM in the pool: no terminal host is attached");
    const all = [...this.slots.values()];
    const accepts = (s: PoolSlot) => currency === undefined || s.currencies.includes(currency);
    if (!all.some(accepts)) return new NoPsamFits("currency", `no PSAM in the pool accepts currency ${currency}`);
    if (keyVersion !== undefined && !all.some((s) => accepts(s) && s.keyVersions.includes(keyVersion))) {
      return new NoPsamFits("keyVersion", `no PSAM in the pool holds key version ${keyVersion}`);
    }
    return undefined;
  }

  /** The least recently used free PSAM the request can use (and `allowed` lets it have). */
  private pickFor(w: Want, allowed: (key: string, s: PoolSlot) => boolean = () => true): [string, PoolSlot] | undefined {
    let best: [string, PoolSlot] | undefined;
    for (const e of this.slots) {
      if (!isFree(e[1]) || !suits(e[1], e[0], w) || (best && e[1].lastUsed >= best[1].lastUsed)) continue;
      if (allowed(e[0], e[1])) best = e;
    }
    return best;
  }

  private take([key, s]: [string, PoolSlot]): Lease {
    const id = ++this.leases;
    s.leaseId = id;
    s.lastUsed = ++this.uses;
    return { terminalId: s.terminalId, psamId: s.psamId, key, id, takenAt: this.clock.now() };
  }

  /** Serves the waiters in arrival order, each with the least recently used free PSAM it can use. */
  private serveWaiters(): void {
    let free = 0;
    for (const s of this.slots.values()) if (isFree(s)) free++;
    if (this.waiters.length === 0 || free === 0) return;
    const served = new Set<Waiter>();
    for (const w of this.waiters) {
      const e = this.pickFor(w.want);
      if (!e) continue;
      served.add(w);
      this.clock.clearTimeout(w.timer);
      w.resolve(this.take(e));
      if (--free === 0) break;
    }
    if (served.size > 0) this.waiters = this.waiters.filter((w) => !served.has(w));
  }

  private describeShortage(w: Want): string {
    if (w.key !== undefined) return `PSAM ${w.key} did not become free in time`;
    const fit = [...this.slots.values()].filter(
      (s) => (w.currency === undefined || s.currencies.includes(w.currency)) && (w.keyVersion === undefined || s.keyVersions.includes(w.keyVersion)),
    );
    if (fit.length === 0) return `no PSAM in the pool accepts currency ${w.currency} with key version ${w.keyVersion}`;
    return `all ${fit.length} PSAMs that fit were busy until the deadline`;
  }
}

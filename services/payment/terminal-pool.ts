// The payment server's view of the terminal pool (the patent's terminal
// interface 230): which PSAMs exist and are free, fair allocation of a PSAM
// to a transaction within the caller's deadline, and the stream to the
// concentrator that carries PSAM jobs and their results.

import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { randomUUID } from "node:crypto";
import { AsyncQueue } from "../../lib/async-queue.js";
import { keepConnected } from "../../lib/streams.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { hexOf, psamId as toPsamId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import {
  PsamJobStatus,
  PsamSlotState,
  TerminalConcentratorServiceDefinition,
  type ConnectPaymentServerRequest,
  type PsamJob,
  type PsamJobResult,
  type PsamSlot,
  type TerminalInfo,
} from "../../gen/netpurse/terminal/v1/terminal.js";

/** A PSAM taken from the pool for one transaction. */
export interface Lease {
  terminalId: string;
  psamId: string;
  key: string;
  /** Which taking of the PSAM this is: a late release of an older lease must not free a newer one. */
  id: number;
  /** When it was taken (ms since the epoch). */
  takenAt: number;
}

interface PoolSlot {
  terminalId: string;
  psamId: string;
  keyVersions: number[];
  currencies: number[];
  /** READY and not leased to another payment server, per the concentrator. */
  available: boolean;
  /** The id of the lease holding the slot, or undefined when it is free here. */
  leaseId: number | undefined;
  lastUsed: number;
}

interface Want {
  currency?: number;
  keyVersion?: number;
  /** A particular PSAM (to finish or reverse the debit it signed). */
  key?: string;
  exclude?: Set<string>;
}

interface Waiter extends Want {
  resolve(l: Lease): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

export class NoPsamFree extends Error {}

/** No PSAM in the pool could ever take the transaction (its currency or key version). */
export class NoPsamFits extends Error {
  constructor(
    readonly what: "currency" | "keyVersion",
    message: string,
  ) {
    super(message);
  }
}

const keyOf = (terminalId: string, psamId: string) => `${terminalId}/${psamId}`;

/** Free PSAMs, handed out first come, first served, each to one transaction at a time. */
export class PsamPool {
  private readonly slots = new Map<string, PoolSlot>();
  private waiters: Waiter[] = [];
  private leases = 0;

  constructor(private readonly onRelease: (l: Lease) => void) {}

  /** Takes in the concentrator's view of one terminal. */
  updateTerminal(t: TerminalInfo): void {
    const seen = new Set<string>();
    for (const s of t.slots) {
      const psam = hexOf(s.psamId?.value);
      const key = keyOf(t.terminalId, psam);
      seen.add(key);
      const old = this.slots.get(key);
      this.slots.set(key, {
        terminalId: t.terminalId,
        psamId: psam,
        keyVersions: s.keyVersions,
        currencies: s.currencies,
        available: s.state === PsamSlotState.PSAM_SLOT_STATE_READY,
        leaseId: old?.leaseId,
        lastUsed: old?.lastUsed ?? 0,
      });
    }
    for (const [k, s] of this.slots) if (s.terminalId === t.terminalId && !seen.has(k)) this.slots.delete(k);
    this.serveWaiters();
  }

  /** Takes in one slot's state from a job result (a PSAM we gave up on may be fine after all). */
  updateSlot(terminalId: string, slot: PsamSlot): void {
    const s = this.slots.get(keyOf(terminalId, hexOf(slot.psamId?.value)));
    if (!s) return;
    s.available = slot.state === PsamSlotState.PSAM_SLOT_STATE_READY;
    this.serveWaiters();
  }

  /** Forgets every terminal (the stream that told us about them ended). */
  clear(): void {
    this.slots.clear();
  }

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

  private matches(s: PoolSlot, key: string, w: Want): boolean {
    if (!s.available || s.leaseId !== undefined) return false;
    if (w.key !== undefined) return key === w.key;
    if (w.exclude?.has(key)) return false;
    if (w.currency !== undefined && !s.currencies.includes(w.currency)) return false;
    if (w.keyVersion !== undefined && !s.keyVersions.includes(w.keyVersion)) return false;
    return true;
  }

  /** The least recently used free PSAM that fits, spreading work across the pool. */
  private pick(w: Want): Lease | undefined {
    let best: [string, PoolSlot] | undefined;
    for (const e of this.slots) if (this.matches(e[1], e[0], w) && (!best || e[1].lastUsed < best[1].lastUsed)) best = e;
    if (!best) return undefined;
    const id = ++this.leases;
    best[1].leaseId = id;
    best[1].lastUsed = Date.now();
    return { terminalId: best[1].terminalId, psamId: best[1].psamId, key: best[0], id, takenAt: Date.now() };
  }

  /** Waits (first come, first served) for a PSAM that fits, until `deadline` (ms since epoch). */
  acquire(w: Want, deadline: number): Promise<Lease> {
    if (w.key === undefined && this.slots.size > 0) {
      const all = [...this.slots.values()];
      if (w.currency !== undefined && !all.some((s) => s.currencies.includes(w.currency!))) {
        return Promise.reject(new NoPsamFits("currency", `no PSAM in the pool accepts currency ${w.currency}`));
      }
      if (
        w.keyVersion !== undefined &&
        !all.some((s) => s.keyVersions.includes(w.keyVersion!) && (w.currency === undefined || s.currencies.includes(w.currency)))
      ) {
        return Promise.reject(new NoPsamFits("keyVersion", `no PSAM in the pool holds key version ${w.keyVersion}`));
      }
    }
    // Earlier waiters go first: take a slot now only if nobody waits for one like it.
    if (!this.waiters.some((x) => this.wantsOverlap(x, w))) {
      const l = this.pick(w);
      if (l) return Promise.resolve(l);
    }
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        ...w,
        resolve,
        reject,
        timer: setTimeout(
          () => {
            this.waiters = this.waiters.filter((x) => x !== waiter);
            reject(new NoPsamFree(this.describeShortage(w)));
          },
          Math.min(2 ** 31 - 1, Math.max(0, deadline - Date.now())),
        ),
      };
      this.waiters.push(waiter);
    });
  }

  private wantsOverlap(a: Want, b: Want): boolean {
    if (a.key !== undefined || b.key !== undefined) return a.key === b.key;
    return a.currency === b.currency;
  }

  release(l: Lease): void {
    const s = this.slots.get(l.key);
    if (s?.leaseId !== l.id) return; // an older lease, or the slot was forgotten meanwhile
    s.leaseId = undefined;
    this.onRelease(l);
    this.serveWaiters();
  }

  private serveWaiters(): void {
    for (const w of [...this.waiters]) {
      const l = this.pick(w);
      if (!l) continue;
      clearTimeout(w.timer);
      this.waiters = this.waiters.filter((x) => x !== w);
      w.resolve(l);
    }
  }

  private describeShortage(w: Want): string {
    if (w.key) return `PSAM ${w.key} did not become free in time`;
    const fit = [...this.slots.values()].filter(
      (s) => (w.currency === undefined || s.currencies.includes(w.currency)) && (w.keyVersion === undefined || s.keyVersions.includes(w.keyVersion)),
    );
    if (fit.length === 0) return `no PSAM in the pool accepts currency ${w.currency} with key version ${w.keyVersion}`;
    return `all ${fit.length} PSAMs that fit were busy until the deadline`;
  }

  /** For operators and tests: [free, leased, total]. */
  counts(): { free: number; leased: number; total: number } {
    let free = 0,
      leased = 0;
    for (const s of this.slots.values()) {
      if (s.leaseId !== undefined) leased++;
      else if (s.available) free++;
    }
    return { free, leased, total: this.slots.size };
  }
}

/** The payment server's stream to the concentrator, reconnected with back-off. */
export class ConcentratorLink {
  private out: AsyncQueue<ConnectPaymentServerRequest> | undefined;
  private readonly pending = new Map<string, { resolve(r: PsamJobResult): void; timer: NodeJS.Timeout; job: PsamJob }>();
  private stopped = false;
  private readonly abort = new AbortController();
  private loop: Promise<void> | undefined;
  private readyResolve!: () => void;
  private ready = new Promise<void>((r) => (this.readyResolve = r));

  constructor(
    private readonly o: {
      address: string;
      paymentServerId: string;
      pool: PsamPool;
      log: Logger;
      /** Called for every terminal the concentrator announces (attach or change). */
      onTerminal(t: TerminalInfo): void;
      /** Called with the PSAM state of a result that came after we gave up on its job. */
      onLateResult(terminalId: string, slot: PsamSlot): void;
    },
  ) {}

  start(): void {
    this.loop = this.run();
  }

  whenReady(): Promise<void> {
    return this.ready;
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.abort.abort();
    await this.loop?.catch(() => undefined);
  }

  private async run(): Promise<void> {
    const channel = openChannel(this.o.address, { maxMessageBytes: 256 * 1024 });
    const client = clientFactory().create(TerminalConcentratorServiceDefinition, channel);
    await keepConnected({
      what: "concentrator",
      session: () => this.session(client),
      stopped: () => this.stopped,
      log: this.o.log,
      afterSession: () => {
        this.failAll("the stream to the concentrator ended before the terminal answered");
        this.o.pool.clear(); // the concentrator announces the pool afresh on the next stream
      },
    });
    channel.close();
  }

  private async session(client: Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>): Promise<void> {
    const out = new AsyncQueue<ConnectPaymentServerRequest>();
    out.push({ message: { $case: "hello", value: { paymentServerId: this.o.paymentServerId, window: 4096 } } });
    try {
      for await (const m of client.connectPaymentServer(out, { signal: this.abort.signal })) {
        const msg = m.message;
        if (!msg) continue;
        switch (msg.$case) {
          case "welcome":
            this.out = out;
            this.o.log.info("connected to the concentrator", { concentrator: msg.value.concentratorId });
            this.readyResolve();
            break;
          case "poolUpdate":
            if (msg.value.terminal) {
              this.o.pool.updateTerminal(msg.value.terminal);
              this.o.onTerminal(msg.value.terminal);
            } else if (msg.value.detachedTerminalId) {
              this.o.pool.removeTerminal(msg.value.detachedTerminalId);
            }
            break;
          case "result": {
            const p = this.pending.get(msg.value.jobId);
            if (!p) {
              // Answered after we gave up on it: what the PSAM did shows in its state.
              if (msg.value.slot) {
                this.o.pool.updateSlot(msg.value.terminalId, msg.value.slot);
                this.o.onLateResult(msg.value.terminalId, msg.value.slot);
              }
              break;
            }
            this.pending.delete(msg.value.jobId);
            clearTimeout(p.timer);
            p.resolve(msg.value);
            break;
          }
          case "ping":
            out.push({ message: { $case: "pong", value: { nonce: msg.value.nonce } } });
            break;
        }
      }
    } finally {
      if (this.out === out) this.out = undefined;
      out.close();
    }
  }

  private failAll(message: string): void {
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.resolve(this.lost(p.job, message));
      this.pending.delete(id);
    }
  }

  private lost(job: PsamJob, message: string): PsamJobResult {
    return {
      jobId: job.jobId,
      terminalId: job.terminalId,
      psamId: job.psamId,
      status: PsamJobStatus.PSAM_JOB_STATUS_TERMINAL_LOST,
      statusWord: 0,
      message,
      slot: undefined,
      outcome: undefined,
    };
  }

  /**
   * Sends one job to a leased PSAM and waits for its result. A job that gets
   * no answer within `timeoutMs`, or whose stream breaks, ends as
   * TERMINAL_LOST: the PSAM may or may not have done it.
   */
  runJob(lease: Lease, job: Omit<PsamJob, "jobId" | "terminalId" | "psamId">, timeoutMs: number): Promise<PsamJobResult> {
    const full: PsamJob = { ...job, jobId: randomUUID(), terminalId: lease.terminalId, psamId: toPsamId(lease.psamId) };
    const out = this.out;
    if (!out) return Promise.resolve({ ...this.lost(full, "not connected to the concentrator"), status: PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM });
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.pending.delete(full.jobId);
        resolve(this.lost(full, `no answer from terminal ${lease.terminalId} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(full.jobId, { resolve, timer, job: full });
      out.push({ message: { $case: "job", value: full } });
    });
  }

  /** Gives a PSAM's lease back at the concentrator. */
  release(l: Lease): void {
    this.out?.push({ message: { $case: "release", value: { terminalId: l.terminalId, psamId: toPsamId(l.psamId) } } });
  }
}

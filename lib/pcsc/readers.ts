// The PC/SC readers this process sees and what is in them, through the
// pcsclite binding (an optional dependency: software cards need none of it).
// One context per process; when pcscd stops, every reader is reported gone
// and the context is opened again with back-off, so a pcscd restart or an
// unplugged reader is survived with a message instead of a crash.

import { EventEmitter } from "node:events";
import type { Logger } from "../log.js";

/** What netpurse uses of the binding's PC/SC context. */
interface PcscContext extends EventEmitter {
  close(): void;
}

/** What netpurse uses of the binding's reader object (pcsclite's CardReader). */
export interface PcscReader extends EventEmitter {
  readonly name: string;
  readonly connected: boolean;
  SCARD_SHARE_EXCLUSIVE: number;
  SCARD_PROTOCOL_T0: number;
  SCARD_PROTOCOL_T1: number;
  SCARD_LEAVE_CARD: number;
  SCARD_RESET_CARD: number;
  connect(options: { share_mode?: number; protocol?: number }, cb: (err: unknown, protocol: number) => void): void;
  disconnect(disposition: number, cb: (err: unknown) => void): void;
  transmit(data: Buffer, resLen: number, protocol: number, cb: (err: unknown, response: Buffer) => void): void;
  close(): void;
}

/** PC/SC cannot be used here: the binding is missing or pcscd is not running. */
export class PcscUnavailable extends Error {}

// SCARD_STATE_* bits (pcsclite.h): the same on every platform pcsc-lite runs on.
const STATE_PRESENT = 0x20;
const STATE_MUTE = 0x200;

/** A reader as last seen. */
export interface ReaderView {
  /** The PC/SC reader name. */
  name: string;
  /** A card is in it and answered to reset. */
  present: boolean;
  /** The card's answer to reset, while present. */
  atr?: Buffer;
}

let binding: Promise<() => PcscContext> | undefined;

/**
 * Resolves once the binding's watch thread of a reader has reported a first
 * status, and a moment more. The binding's close() cancels the watch and
 * then waits for its thread without a limit: a cancel sent before the
 * thread has entered its first status call is lost, and close() hangs the
 * process. So a reader is closed only after its watch is under way.
 */
function firstStatus(reader: PcscReader): Promise<void> {
  return new Promise<void>((resolve) => {
    reader.once("status", () => resolve());
    reader.once("error", () => resolve());
    reader.once("end", () => resolve());
  }).then(() => new Promise((r) => setTimeout(r, 250)));
}

/** Waits for `p` at most 3 s: a reader that never reports is closed anyway. */
function settled(p: Promise<void>): Promise<void> {
  return Promise.race([p, new Promise<void>((r) => setTimeout(r, 3_000).unref())]);
}

/** The pcsclite binding, loaded on first use only. */
export function loadPcsclite(): Promise<() => PcscContext> {
  binding ??= import("pcsclite").then(
    (m: { default: unknown }) => m.default as () => PcscContext,
    (e: unknown) => {
      binding = undefined;
      throw new PcscUnavailable(
        `the PC/SC binding (npm package pcsclite) is not installed or not built (${(e as Error).message.split("\n")[0]}): ` +
          "install Debian's pcscd and libpcsclite-dev, then run npm install again",
      );
    },
  );
  return binding;
}

interface Entry {
  reader: PcscReader;
  view: ReaderView;
  /** Resolves once the binding's watch of the reader has reported (its thread is in its status loop). */
  watching: Promise<void>;
  /** The binding stopped watching it; a rescan takes it up again. */
  ended?: boolean;
}

/**
 * Events: "reader" (name) when a reader appears, "reader-removed" (name),
 * "card-inserted" (name, atr), "card-removed" (name), "service-lost"
 * (message) when pcscd goes away, "service-back" when it answers again.
 */
export class PcscReaders extends EventEmitter {
  private ctx: PcscContext | undefined;
  private readonly entries = new Map<string, Entry>();
  private closed = false;
  private lost = false;
  private retryMs = 250;
  private timer: NodeJS.Timeout | undefined;
  private firstSeen: Promise<void>;
  private markSeen!: () => void;

  private constructor(
    private readonly create: () => PcscContext,
    private readonly log?: Logger,
  ) {
    super();
    this.firstSeen = new Promise((r) => (this.markSeen = r));
  }

  /** Opens the PC/SC context. Throws PcscUnavailable when the binding is missing; a pcscd that is down is waited for. */
  static async open(o: { log?: Logger; settleMs?: number } = {}): Promise<PcscReaders> {
    const r = new PcscReaders(await loadPcsclite(), o.log);
    r.start();
    // The binding reports readers one by one, each with its first status: give it a moment before the first listing.
    await Promise.race([r.firstSeen, new Promise((res) => setTimeout(res, o.settleMs ?? 300))]);
    await new Promise((res) => setTimeout(res, 50));
    return r;
  }

  /** Whether pcscd answered the last time it was asked. */
  get serviceUp(): boolean {
    return this.ctx !== undefined && !this.lost;
  }

  /** Every reader seen, in name order. */
  list(): ReaderView[] {
    return [...this.entries.values()].map((e) => ({ ...e.view })).sort((a, b) => a.name.localeCompare(b.name));
  }

  /** The binding's reader object of a name (for the transport). */
  reader(name: string): PcscReader | undefined {
    return this.entries.get(name)?.reader;
  }

  view(name: string): ReaderView | undefined {
    const e = this.entries.get(name);
    return e ? { ...e.view } : undefined;
  }

  /** Resolves when `test` holds for the readers, or with undefined after `timeoutMs`. */
  async waitFor<T>(test: () => T | undefined, timeoutMs: number): Promise<T | undefined> {
    const now = test();
    if (now !== undefined || timeoutMs <= 0) return now;
    return new Promise((resolve) => {
      const events = ["reader", "card-inserted", "card-removed", "reader-removed", "service-back"];
      const check = () => {
        const v = test();
        if (v !== undefined) done(v);
      };
      const done = (v: T | undefined) => {
        clearTimeout(t);
        for (const e of events) this.off(e, check);
        resolve(v);
      };
      const t = setTimeout(() => done(test()), timeoutMs);
      for (const e of events) this.on(e, check);
    });
  }

  /** Lets go of pcscd: every reader's watch and the context. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    clearTimeout(this.rescanTimer);
    // Closing is not the cards leaving: nobody is told they were taken out.
    this.removeAllListeners();
    await Promise.all([...this.entries.values()].map((e) => settled(e.watching)));
    this.drop();
  }

  private start(): void {
    if (this.closed) return;
    let ctx: PcscContext;
    try {
      ctx = this.create();
    } catch (e) {
      this.serviceLost(e);
      return;
    }
    this.ctx = ctx;
    ctx.on("reader", (reader: PcscReader) => this.addReader(reader));
    ctx.on("error", (e: unknown) => this.serviceLost(e));
    // No error within a moment means pcscd answered.
    setTimeout(() => {
      if (this.ctx === ctx && this.lost) {
        this.lost = false;
        this.retryMs = 250;
        this.log?.info("PC/SC service answers again");
        this.emit("service-back");
      }
      this.markSeen();
    }, 150).unref();
  }

  private rescanTimer: NodeJS.Timeout | undefined;

  private scheduleRescan(): void {
    if (this.rescanTimer) return;
    this.rescanTimer = setTimeout(() => {
      this.rescanTimer = undefined;
      this.rescan();
    }, 200);
    this.rescanTimer.unref();
  }

  /** Opens a fresh context: readers it lists that were no longer watched are watched again; the others stay as they are. */
  private rescan(): void {
    if (this.closed || this.lost) return;
    const old = this.ctx;
    let next: PcscContext;
    try {
      next = this.create();
    } catch (e) {
      this.serviceLost(e);
      return;
    }
    this.ctx = next;
    next.on("reader", (reader: PcscReader) => {
      const known = this.entries.get(reader.name);
      if (known && !known.ended) {
        // Still watched through the old context's reader: this one goes, once its watch has started.
        settled(firstStatus(reader))
          .then(() => reader.close())
          .catch(() => undefined);
        return;
      }
      this.addReader(reader, known?.view);
    });
    next.on("error", (e: unknown) => this.serviceLost(e));
    if (old) {
      old.removeAllListeners("reader");
      old.removeAllListeners("error");
      try {
        old.close();
      } catch {
        // gone already
      }
    }
    // Readers the fresh context does not list are unplugged.
    setTimeout(() => {
      for (const [name, e] of [...this.entries]) {
        if (!e.ended) continue;
        this.entries.delete(name);
        if (e.view.present) this.emit("card-removed", name);
        this.emit("reader-removed", name);
      }
    }, 1_000).unref();
  }

  private addReader(reader: PcscReader, seen?: ReaderView): void {
    const entry: Entry = { reader, view: seen ?? { name: reader.name, present: false }, watching: firstStatus(reader) };
    this.entries.set(reader.name, entry);
    if (!seen) this.emit("reader", reader.name);
    reader.on("status", (status: { state: number; atr?: Buffer }) => {
      const present = (status.state & STATE_PRESENT) !== 0 && (status.state & STATE_MUTE) === 0;
      this.log?.debug("reader status", { reader: reader.name, state: status.state.toString(16), present });
      const was = entry.view.present;
      entry.view = { name: reader.name, present, ...(present && status.atr?.length ? { atr: Buffer.from(status.atr) } : {}) };
      if (present && !was) this.emit("card-inserted", reader.name, entry.view.atr);
      if (!present && was) this.emit("card-removed", reader.name);
      this.markSeen();
    });
    reader.on("end", () => {
      if (this.closed || this.entries.get(reader.name) !== entry) return;
      // The binding stops watching a reader after any failed status poll (a card pulled mid-command can do
      // it) and never lists it again while it stays plugged in: a fresh context takes it up.
      entry.ended = true;
      this.scheduleRescan();
    });
    // A reader's errors (a status poll that failed as pcscd went away) are the context's business.
    reader.on("error", (e: unknown) => this.log?.debug?.("PC/SC reader error", { reader: reader.name, error: String((e as Error)?.message ?? e) }));
  }

  private serviceLost(e: unknown): void {
    if (this.closed) return;
    const message = `PC/SC service unavailable (${String((e as Error)?.message ?? e)}); is pcscd running? Retrying`;
    if (!this.lost) {
      this.lost = true;
      this.log?.warn("PC/SC service lost; readers are gone until it is back", { error: String((e as Error)?.message ?? e) });
      this.emit("service-lost", message);
    }
    this.drop();
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.start(), this.retryMs);
    this.timer.unref();
    this.retryMs = Math.min(this.retryMs * 2, 5_000);
  }

  /** Forgets the context and every reader (each reported gone). */
  private drop(): void {
    const ctx = this.ctx;
    this.ctx = undefined;
    for (const [name, e] of [...this.entries]) {
      this.entries.delete(name);
      e.reader.removeAllListeners("status");
      try {
        e.reader.close();
      } catch {
        // already gone with the service
      }
      if (e.view.present) this.emit("card-removed", name);
      this.emit("reader-removed", name);
    }
    if (ctx) {
      ctx.removeAllListeners("reader");
      try {
        ctx.close();
      } catch {
        // already gone with the service
      }
    }
  }
}

// The chatty baseline: the remote-reader approach netpurse replaces. The
// server holds the PSAMs and drives the cardholder's card itself, one APDU
// per network round trip over a bidirectional stream: the cardholder opens
// the stream with the card's answer to reset ("card inserted"), the server
// takes a free PSAM, sends SELECT and INITIALIZE FOR PURCHASE to the card,
// has its PSAM check the card and sign the DEBIT command (locally), sends
// DEBIT to the card, has the PSAM verify the card's answer, and gives the
// PSAM back. The PSAM is held across all three of the card's round trips.
//
// It is the project's own card and PSAM protocol (PurseReader, PsamDriver)
// with the card behind a transport that crosses the network; there is no
// merchant, encryption layer or transaction database, so the baseline is
// cheaper per purchase than a real remote-reader system would be.

import { randomUUID } from "node:crypto";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { ServerError, Status, type CallContext } from "nice-grpc";
import { PurseReader } from "../client/card/purse-reader.js";
import { SW, swHex } from "../lib/apdu/apdu.js";
import { InProcessTransport, type CardTransport } from "../lib/apdu/transport.js";
import { AsyncQueue } from "../lib/async-queue.js";
import { callDeadline } from "../lib/grpc/server.js";
import { Verdict } from "../lib/protocol/psam.js";
import { PsamDriver } from "../services/terminal/psam/psam-driver.js";
import { SoftwarePsam } from "../services/terminal/psam/software-psam.js";
import { RawBytes } from "./raw-bytes.js";

export const RemoteReaderDefinition = {
  name: "RemoteReader",
  fullName: "netpurse.bench.RemoteReader",
  methods: {
    /** Cardholder → server: the card's ATR, then one response APDU per command; server → cardholder: command APDUs. */
    purchase: { name: "Purchase", requestType: RawBytes, requestStream: true, responseType: RawBytes, responseStream: true, options: {} },
    /** The PSAM leases so far, as JSON (HoldLog). */
    readHolds: { name: "ReadHolds", requestType: RawBytes, requestStream: false, responseType: RawBytes, responseStream: false, options: {} },
  },
} as const;

export interface HoldLog {
  /** Per purchase, [released at (ms since the epoch), held ms]. */
  holds: [number, number][];
  failures: Record<string, number>;
}

/** As the terminal host does, a batch is closed before it fills the PSAM (256 records). */
const BATCH_CLOSE_AT = 200;

/** Longest wait for a PSAM when the cardholder set no deadline. */
const MAX_PSAM_WAIT_MS = 30_000;

interface Slot {
  psamId: string;
  currency: number;
  driver: PsamDriver;
}

/** The PSAMs, lent one purchase at a time, first come first served. */
class PsamSlots {
  private readonly waiting: { resolve: (s: Slot) => void; reject: (e: Error) => void }[] = [];

  constructor(private readonly free: Slot[]) {}

  acquire(deadline: number, signal: AbortSignal): Promise<Slot> {
    const slot = this.free.shift();
    if (slot) return Promise.resolve(slot);
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (s: Slot) => {
          cleanup();
          resolve(s);
        },
        reject: (e: Error) => {
          cleanup();
          reject(e);
        },
      };
      const timer = setTimeout(
        () => waiter.reject(new ServerError(Status.RESOURCE_EXHAUSTED, "no PSAM became free before the deadline")),
        Math.max(0, deadline - Date.now()),
      );
      const onAbort = () => waiter.reject(new ServerError(Status.CANCELLED, "the cardholder went away while waiting for a PSAM"));
      const cleanup = () => {
        clearTimeout(timer);
        signal.removeEventListener("abort", onAbort);
        const i = this.waiting.indexOf(waiter);
        if (i >= 0) this.waiting.splice(i, 1);
      };
      signal.addEventListener("abort", onAbort);
      this.waiting.push(waiter);
    });
  }

  release(slot: Slot): void {
    const next = this.waiting.shift();
    if (next) next.resolve(slot);
    else this.free.push(slot);
  }
}

/** The cardholder's card as the server sees it: each command goes down the stream, and its response comes back up. */
class RemoteCard implements CardTransport {
  constructor(
    private readonly atr: Buffer,
    private readonly commands: AsyncQueue<Uint8Array>,
    private readonly responses: AsyncIterator<Uint8Array>,
    private readonly signal: AbortSignal,
  ) {}

  async isPresent(): Promise<boolean> {
    return true;
  }

  /** The reader reported the ATR when the card went in: no round trip. */
  async reset(): Promise<Buffer> {
    return this.atr;
  }

  async transmit(command: Buffer): Promise<Buffer> {
    this.commands.push(command);
    return nextMessage(this.responses, this.signal, "a response APDU");
  }

  async close(): Promise<void> {}
}

async function nextMessage(from: AsyncIterator<Uint8Array>, signal: AbortSignal, what: string): Promise<Buffer> {
  if (signal.aborted) throw new ServerError(Status.CANCELLED, "the cardholder went away");
  let onAbort!: () => void;
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => reject(new ServerError(Status.CANCELLED, "the cardholder went away"));
    signal.addEventListener("abort", onAbort, { once: true });
  });
  try {
    const r = await Promise.race([from.next(), aborted]);
    if (r.done) throw new ServerError(Status.CANCELLED, `the cardholder closed the stream instead of sending ${what}`);
    return Buffer.from(r.value);
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

export class RemoteReader {
  private readonly log: HoldLog = { holds: [], failures: {} };

  private constructor(
    private readonly slots: PsamSlots,
    private readonly sale: { amountMinor: number; merchantId: string },
  ) {}

  /** Opens every software PSAM file in `psamDir` and selects its application. */
  static async open(psamDir: string, sale: { amountMinor: number; merchantId: string }): Promise<RemoteReader> {
    const slots: Slot[] = [];
    for (const file of (await readdir(psamDir)).filter((f) => f.endsWith(".psam.json")).sort()) {
      const psam = await SoftwarePsam.open(join(psamDir, file));
      const driver = new PsamDriver(new InProcessTransport(psam));
      await driver.connect();
      slots.push({ psamId: psam.psamId, currency: psam.currency, driver });
    }
    if (slots.length === 0) throw new Error(`no PSAM files (*.psam.json) in ${psamDir}`);
    return new RemoteReader(new PsamSlots(slots), sale);
  }

  readonly service = {
    purchase: (requests: AsyncIterable<Uint8Array>, ctx: CallContext) => this.purchase(requests, ctx),
    readHolds: async (): Promise<Uint8Array> => Buffer.from(JSON.stringify(this.log)),
  };

  private async *purchase(requests: AsyncIterable<Uint8Array>, ctx: CallContext): AsyncIterable<Uint8Array> {
    const commands = new AsyncQueue<Uint8Array>();
    void this.serve(requests[Symbol.asyncIterator](), commands, ctx).then(
      () => commands.close(),
      (e: unknown) => {
        const message = e instanceof ServerError ? e.details : (e as Error).message;
        this.log.failures[message] = (this.log.failures[message] ?? 0) + 1;
        commands.close(e instanceof ServerError ? e : new ServerError(Status.ABORTED, message));
      },
    );
    yield* commands;
  }

  /** One purchase: the card's ATR, a PSAM for the whole exchange, then the card driven remotely. */
  private async serve(responses: AsyncIterator<Uint8Array>, commands: AsyncQueue<Uint8Array>, ctx: CallContext): Promise<void> {
    const atr = await nextMessage(responses, ctx.signal, "the card's answer to reset");
    const card = new RemoteCard(atr, commands, responses, ctx.signal);
    const slot = await this.slots.acquire(Math.min(callDeadline(ctx) ?? Infinity, Date.now() + MAX_PSAM_WAIT_MS), ctx.signal);
    const takenAt = performance.now();
    try {
      await this.pay(slot, new PurseReader(card));
    } finally {
      this.slots.release(slot);
      this.log.holds.push([Date.now(), performance.now() - takenAt]);
    }
  }

  private async pay(slot: Slot, reader: PurseReader): Promise<void> {
    await reader.connect(); // SELECT: round trip 1
    const init = await reader.initializeForPurchase(); // round trip 2
    const issued = await slot.driver.issueDebitCommand({
      cardAtr: reader.answerToReset,
      initializeResponse: init.raw,
      draw: { amount: this.sale.amountMinor, currency: slot.currency, transactionRef: randomUUID(), merchantId: this.sale.merchantId },
      returnExpectedSignature: false,
    });
    let settled = false;
    try {
      const answer = await reader.debit(issued.debitCommand); // round trip 3
      if (answer.sw !== SW.OK) throw new ServerError(Status.FAILED_PRECONDITION, `the card refused DEBIT with SW ${swHex(answer.sw)}`);
      const v = await slot.driver.verifyDebit(issued.psamCounter, answer.raw);
      settled = true;
      if (v.verdict !== Verdict.RECORDED) throw new ServerError(Status.FAILED_PRECONDITION, "the card declined the debit");
    } finally {
      // A debit the card did not prove must not stay open in the PSAM (it holds at most 64).
      if (!settled) await slot.driver.reverseDebit(issued.psamCounter).catch(() => undefined);
    }
    if ((await slot.driver.readStatus()).batchCount >= BATCH_CLOSE_AT) await slot.driver.closeBatch();
  }
}

// A card in an emulated PC/SC reader: one CardApplication (a software card or
// software PSAM) served to one slot of the vsmartcard vpcd driver loaded in
// pcscd. The card is vpcd's TCP client on 127.0.0.1:PORT; each frame is a
// 2-byte big-endian length and a payload (vpcd-frames.ts). A 1-byte payload
// is a control (00 power off, 01 power on, 02 reset: no answer; 04 get ATR:
// answered with the ATR), a longer one a command APDU, answered with the
// response APDU. Closing the connection takes the card out of the reader.
//
// It reconnects, with a short back-off, whenever the connection drops or is
// refused: that is how a card survives a pcscd restart, and why it can be
// started before pcscd. remove() takes it out (and stops reconnecting),
// insert() puts it back.
//
// The connection itself lives in a worker thread (vpcd-link.ts), which
// answers vpcd's presence polls (get ATR, several a second) without the main
// thread. The pcsclite binding makes some of its calls to pcscd
// synchronously on the main thread (a context made or released), and pcscd
// can hold such a call until a card has answered vpcd: were the card's
// socket on that same blocked thread, neither would ever go on. Command
// APDUs still run on the main thread, in the card application; so a process
// must not make a synchronous pcsclite call while pcscd waits for one of its
// own cards' answers (release a context while it transmits to that reader).

import { EventEmitter } from "node:events";
import { Worker } from "node:worker_threads";
import { encodeResponse, status } from "../../lib/apdu/apdu.js";
import type { CardApplication } from "../../lib/apdu/transport.js";
import type { Logger } from "../../lib/log.js";
import type { FromLink, LinkData, ToLink } from "./vpcd-link.js";

export { FrameReader, MAX_COMMAND_BYTES, VpcdControl, vpcdFrame, type Frame } from "./vpcd-frames.js";

/** No precise diagnosis: what the reader gets when the card application fails outside its status words. */
const SW_NO_PRECISE_DIAGNOSIS = 0x6f00;

// The link runs TypeScript in a fresh thread: tsx's loader hooks are per thread, so the thread registers them first.
const TSX_API = import.meta.resolve("tsx/esm/api");
const LINK = new URL("./vpcd-link.ts", import.meta.url).href;
const BOOT = `import(${JSON.stringify(TSX_API)}).then((tsx) => { tsx.register(); return import(${JSON.stringify(LINK)}); });`;

export interface VirtualCardOptions {
  /** For log lines and events (default "card on port PORT"). */
  name?: string;
  /** vpcd's address; loopback unless a test says otherwise. */
  host?: string;
  /** Connect and disconnect lines, and frames refused. */
  log?: Logger;
  /** Back-off between connection attempts: from min, doubling, to max (ms; default 100 and 2000). */
  minBackoffMs?: number;
  maxBackoffMs?: number;
}

/**
 * Events: "connect" (TCP connection to vpcd made), "ready" (vpcd sent its first frame: the reader
 * sees the card), "disconnect" ({ reason }: the connection ended), "refused" ({ frame, answered }:
 * a frame that is neither a command nor a control). None carries key material.
 */
export class VirtualCard extends EventEmitter {
  readonly name: string;
  private readonly data: Omit<LinkData, "atr">;
  private readonly log: Logger | undefined;
  private link: Worker | undefined;
  private linkExited: Promise<void> = Promise.resolve();
  private wanted = false;
  private isReady = false;
  /** APDUs are processed one at a time, in order, as a card does. */
  private work: Promise<void> = Promise.resolve();
  /** Fault injection: the INS after whose processing the card is taken out, its answer never sent. */
  private takeOutAfterIns: number | undefined;

  constructor(
    readonly app: CardApplication,
    readonly port: number,
    o: VirtualCardOptions = {},
  ) {
    super();
    this.name = o.name ?? `card on port ${port}`;
    this.log = o.log;
    this.data = { host: o.host ?? "127.0.0.1", port, minBackoffMs: o.minBackoffMs ?? 100, maxBackoffMs: o.maxBackoffMs ?? 2_000 };
  }

  /** Whether the card is meant to be in the reader (insert() called, remove() not since). */
  get inserted(): boolean {
    return this.wanted;
  }

  /** Whether vpcd is talking to the card now. */
  get ready(): boolean {
    return this.isReady;
  }

  /** Puts the card in the reader: connects to vpcd, and keeps reconnecting until remove(). */
  insert(): void {
    if (this.wanted) return;
    this.wanted = true;
    this.startLink();
  }

  /** Takes the card out: disconnects, stops reconnecting, and resolves once the connection is closed. */
  async remove(): Promise<void> {
    this.wanted = false;
    const link = this.link;
    if (!link) return;
    this.send(link, { type: "stop" });
    // A link that does not stop by itself is ended; it has nothing left to answer.
    const killer = setTimeout(() => {
      link.terminate().catch(() => undefined);
    }, 2_000);
    await this.linkExited;
    clearTimeout(killer);
  }

  /**
   * Fault injection, once: the next command with this INS is processed (the
   * card does its work and keeps its state), then the card is taken out
   * before its answer leaves, as a cardholder pulling it mid-command would.
   */
  takeOutAfter(ins: number): void {
    this.takeOutAfterIns = ins;
  }

  /** Resolves once vpcd talks to the card (now, if it already does). */
  whenReady(timeoutMs = 10_000): Promise<void> {
    if (this.isReady) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.off("ready", onReady);
        reject(
          new Error(
            `${this.name}: vpcd on ${this.data.host}:${this.port} did not talk to the card within ${timeoutMs} ms (is pcscd running with its reader configuration?)`,
          ),
        );
      }, timeoutMs);
      const onReady = () => {
        clearTimeout(timer);
        resolve();
      };
      this.once("ready", onReady);
    });
  }

  private startLink(): void {
    // Inserting a card powers it up: any session is gone.
    const atr = this.app.reset();
    const link = new Worker(BOOT, { eval: true, workerData: { ...this.data, atr } satisfies LinkData, execArgv: [] });
    this.link = link;
    link.on("message", (m: FromLink) => this.onLink(link, m));
    link.on("error", (e) => this.log?.error("vpcd link failed", { card: this.name, error: e.message }));
    this.linkExited = new Promise((resolve) => {
      link.once("exit", () => {
        if (this.link === link) this.link = undefined;
        if (this.isReady) {
          this.isReady = false;
          this.emit("disconnect", { reason: "link ended" });
        }
        // A link that failed while the card is in is started again.
        if (this.wanted) {
          setTimeout(() => {
            if (this.wanted && !this.link) this.startLink();
          }, this.data.maxBackoffMs);
        }
        resolve();
      });
    });
  }

  /** Runs `step` after everything queued before it; a failure is logged and the queue goes on. */
  private enqueue(step: () => void | Promise<void>): void {
    this.work = this.work.then(step).catch((e: unknown) => {
      this.log?.error("card step failed", { card: this.name, error: (e as Error).message });
    });
  }

  private send(link: Worker, m: ToLink): void {
    link.postMessage(m);
  }

  private onLink(link: Worker, m: FromLink): void {
    switch (m.type) {
      case "connect":
        this.log?.info("card connected to vpcd", { card: this.name, port: this.port });
        this.emit("connect");
        return;
      case "ready":
        this.isReady = true;
        this.emit("ready");
        return;
      case "disconnect":
        this.isReady = false;
        this.log?.info("card disconnected from vpcd", { card: this.name, port: this.port, reason: m.reason });
        this.emit("disconnect", { reason: m.reason });
        return;
      case "power":
        // Power off, on or reset: the application forgets its session. Queued behind any APDU in progress.
        this.enqueue(() => this.send(link, { type: "atr", atr: this.app.reset() }));
        return;
      case "refused":
        this.log?.warn("frame refused", { card: this.name, port: this.port, frame: m.frame, answered: m.answered });
        this.emit("refused", { frame: m.frame, answered: m.answered });
        return;
      case "apdu":
        this.enqueue(async () => {
          let response: Buffer;
          try {
            response = await this.app.process(Buffer.from(m.bytes));
          } catch (e) {
            // The application failed in a way it does not map to a status word: the reader still gets an answer.
            this.log?.error("card application failed", { card: this.name, error: (e as Error).message });
            response = encodeResponse(status(SW_NO_PRECISE_DIAGNOSIS));
          }
          if (this.takeOutAfterIns !== undefined && m.bytes[1] === this.takeOutAfterIns) {
            this.takeOutAfterIns = undefined;
            this.log?.warn("card taken out after its command, before answering (fault injection)", { card: this.name });
            await this.remove();
            return;
          }
          this.send(link, { type: "response", seq: m.seq, bytes: response });
        });
        return;
    }
  }
}

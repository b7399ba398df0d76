// A card or PSAM in a PC/SC reader, as a CardTransport: the same APDUs the
// software card and PSAM answer in-process, through pcscd. The reader is
// held exclusively from reset to the end of the work (no other program can
// select another application in between) and let go once idle, so that
// `netpurse readers` or opensc-tool can look at the card between operations.

import { selectCommand, SW, decodeResponse, encodeCommand } from "../apdu/apdu.js";
import type { CardTransport } from "../apdu/transport.js";
import type { Logger } from "../log.js";
import type { PcscReader, PcscReaders } from "./readers.js";

/** The card cannot be reached: taken out, reader gone, or pcscd down. */
export class CardUnreachable extends Error {}

/** Largest response to a short APDU: 256 data bytes and the status word. */
const MAX_RESPONSE = 258;

function promise<T>(run: (cb: (err: unknown, value: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => run((err, value) => (err ? reject(err instanceof Error ? err : new Error(JSON.stringify(err))) : resolve(value))));
}

/**
 * Ends a connection the card's removal broke. pcscd keeps an exclusive
 * connection, and the reader with it, until it is ended, even across the card
 * going and coming back; and the binding would reuse it. Not with a reset:
 * the card it was made for is gone.
 */
async function endStale(reader: PcscReader): Promise<void> {
  if (!reader.connected) return;
  await promise<void>((cb) => reader.disconnect(reader.SCARD_LEAVE_CARD, (err) => cb(err, undefined))).catch(() => undefined);
}

/** Which reader a transport uses: a fixed name, or the first reader holding a card that answers SELECT of `aid`. */
export type ReaderChoice = { name: string } | { holding: Buffer; pattern?: RegExp };

export class PcscTransport implements CardTransport {
  private current: { name: string; reader: PcscReader; protocol: number } | undefined;
  private idle: NodeJS.Timeout | undefined;
  private chosen: string | undefined;

  constructor(
    private readonly readers: PcscReaders,
    private readonly choice: ReaderChoice,
    private readonly o: {
      log?: Logger;
      /** How long to wait for a card before saying there is none (default 0). */
      waitForCardMs?: number;
      /** Let go of the reader after this long without a command (default 5 s; the card stays powered, and its session with it). */
      releaseAfterMs?: number;
      /** Keep the reader for good (a terminal host's PSAM: no one else has business with it). */
      hold?: boolean;
    } = {},
  ) {
    // A card taken out or a reader gone ends the exclusive hold at once.
    readers.on("card-removed", this.gone);
    readers.on("reader-removed", this.gone);
  }

  /** The reader in use or last used, for messages. */
  get readerName(): string | undefined {
    return this.chosen ?? ("name" in this.choice ? this.choice.name : undefined);
  }

  async isPresent(): Promise<boolean> {
    return (await this.find()) !== undefined;
  }

  /** Takes the reader exclusively, resetting the card, and returns its answer to reset. */
  async reset(): Promise<Buffer> {
    const name = await this.find();
    if (!name) throw new CardUnreachable(this.absentMessage());
    await this.open(name, true);
    // The ATR as the reader's watch reported it: the binding's get_status would take that watch's callback over.
    const atr = this.readers.view(name)?.atr;
    if (!atr?.length) throw new CardUnreachable(`the card in "${name}" went away as it was reset; insert it again`);
    return atr;
  }

  /**
   * Takes the reader exclusively. With `reset`, the card starts afresh;
   * without (taking the reader again after an idle release, mid-work), the
   * card keeps its selected application and session, as it stayed powered.
   */
  private async open(name: string, reset: boolean): Promise<void> {
    await this.release(reset);
    const reader = this.readers.reader(name);
    if (!reader) throw new CardUnreachable(`reader "${name}" is gone`);
    await endStale(reader);
    const protocol = await promise<number>((cb) =>
      reader.connect({ share_mode: reader.SCARD_SHARE_EXCLUSIVE, protocol: reader.SCARD_PROTOCOL_T0 | reader.SCARD_PROTOCOL_T1 }, cb),
    ).catch((e: unknown) => {
      throw new CardUnreachable(`cannot connect to the card in "${name}": ${(e as Error).message}`);
    });
    this.current = { name, reader, protocol };
    this.chosen = name;
    this.touch();
  }

  async transmit(command: Buffer): Promise<Buffer> {
    if (!this.current) {
      const name = await this.find();
      if (!name) throw new CardUnreachable(this.absentMessage());
      await this.open(name, false);
    }
    const c = this.current;
    if (!c) throw new CardUnreachable(this.absentMessage());
    clearTimeout(this.idle);
    try {
      const response = await promise<Buffer>((cb) => c.reader.transmit(command, MAX_RESPONSE, c.protocol, cb));
      // A card that went away mid-command can leave the driver answering with nothing at all.
      if (response.length < 2) throw new Error("no answer (the response holds no status word)");
      return response;
    } catch (e) {
      this.current = undefined;
      await endStale(c.reader);
      const view = this.readers.view(c.name);
      const why = !this.readers.serviceUp
        ? "the PC/SC service is down"
        : !view
          ? "the reader is gone"
          : !view.present
            ? "the card was taken out"
            : (e as Error).message;
      throw new CardUnreachable(`card in "${c.name}" did not answer: ${why}`);
    } finally {
      this.touch();
    }
  }

  async close(): Promise<void> {
    clearTimeout(this.idle);
    this.readers.off("card-removed", this.gone);
    this.readers.off("reader-removed", this.gone);
    await this.release(false);
  }

  /** The reader to use now, waiting up to waitForCardMs for a card. */
  private async find(): Promise<string | undefined> {
    if (this.current && this.readers.view(this.current.name)?.present) return this.current.name;
    return this.readers.waitFor(() => this.pick(), this.o.waitForCardMs ?? 0).then((n) => n ?? this.probe());
  }

  /** A reader that qualifies without talking to a card: the fixed one, or the last chosen while its card stays. */
  private pick(): string | undefined {
    if ("name" in this.choice) return this.readers.view(this.choice.name)?.present ? this.choice.name : undefined;
    if (this.chosen && this.readers.view(this.chosen)?.present) return this.chosen;
    return undefined;
  }

  /** The first reader whose card answers SELECT of the application (readers in name order). */
  private async probe(): Promise<string | undefined> {
    if ("name" in this.choice) return undefined;
    const { holding, pattern } = this.choice;
    for (const v of this.readers.list()) {
      if (!v.present || (pattern && !pattern.test(v.name))) continue;
      const reader = this.readers.reader(v.name);
      if (!reader) continue;
      try {
        if (reader.connected) await promise<void>((cb) => reader.disconnect(reader.SCARD_LEAVE_CARD, (err) => cb(err, undefined))).catch(() => undefined);
        const protocol = await promise<number>((cb) =>
          reader.connect({ share_mode: reader.SCARD_SHARE_EXCLUSIVE, protocol: reader.SCARD_PROTOCOL_T0 | reader.SCARD_PROTOCOL_T1 }, cb),
        );
        const r = decodeResponse(await promise<Buffer>((cb) => reader.transmit(encodeCommand(selectCommand(holding)), MAX_RESPONSE, protocol, cb)));
        await promise<void>((cb) => reader.disconnect(reader.SCARD_LEAVE_CARD, (err) => cb(err, undefined)));
        if (r.sw === SW.OK) {
          this.chosen = v.name;
          this.o.log?.info("netpurse card found", { reader: v.name });
          return v.name;
        }
      } catch {
        // Busy with another program, or taken out meanwhile: try the next.
      }
    }
    return undefined;
  }

  private absentMessage(): string {
    if (!this.readers.serviceUp) return "the PC/SC service (pcscd) is not running; start it and try again";
    if ("name" in this.choice) {
      return this.readers.view(this.choice.name)
        ? `no card in reader "${this.choice.name}"; insert the card and try again`
        : `reader "${this.choice.name}" is not connected (readers: ${
            this.readers
              .list()
              .map((r) => `"${r.name}"`)
              .join(", ") || "none"
          })`;
    }
    return `no reader holds a netpurse card (readers: ${
      this.readers
        .list()
        .map((r) => `"${r.name}"${r.present ? " with a card" : ""}`)
        .join(", ") || "none"
    }); insert the card and try again`;
  }

  /** Lets go of the reader after a quiet moment, leaving the card powered and its state as it is. */
  private touch(): void {
    clearTimeout(this.idle);
    if (this.o.hold) return;
    this.idle = setTimeout(() => {
      this.release(false).catch(() => undefined);
    }, this.o.releaseAfterMs ?? 5_000);
    this.idle.unref();
  }

  private async release(reset: boolean): Promise<void> {
    const c = this.current;
    this.current = undefined;
    if (!c?.reader.connected) return;
    await promise<void>((cb) => c.reader.disconnect(reset ? c.reader.SCARD_RESET_CARD : c.reader.SCARD_LEAVE_CARD, (err) => cb(err, undefined))).catch(
      () => undefined,
    );
  }

  private readonly gone = (name: string): void => {
    const c = this.current;
    if (c?.name !== name) return;
    this.o.log?.warn("card out of reach", { reader: name });
    this.current = undefined;
    endStale(c.reader).catch(() => undefined);
  };
}

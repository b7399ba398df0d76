// The client's side of the purse protocol: the commands the client module
// sends to the card (through whatever transport reaches it) and the parsed
// answers.

import { ApduError, selectCommand, SW, type ResponseApdu } from "../../lib/apdu/apdu.js";
import { exchange, type CardTransport } from "../../lib/apdu/transport.js";
import {
  DebitCommand,
  DebitResponse,
  InitializeForPurchaseResponse,
  LogRecord,
  PURSE_AID,
  PURSE_CLA,
  PurchaseSelector,
  PurseIns,
  ReadPurseResponse,
  type CardLogRecord,
  type DebitAnswer,
  type InitializeForPurchase,
  type PurseData,
} from "../../lib/protocol/purse.js";
import {
  InitializeForLoadCommand,
  InitializeForLoadResponse,
  LoadResponse,
  type LoadAnswer,
  type LoadInit,
  type LoadInitCommand,
} from "../../lib/protocol/load.js";
import { CARD_LOG_SIZE } from "./software-card.js";

function expectOk(r: ResponseApdu, what: string): Buffer {
  if (r.sw !== SW.OK) throw new ApduError(r.sw, `card refused ${what}`);
  return r.data;
}

export class PurseReader {
  private atr: Buffer | undefined;

  constructor(private readonly transport: CardTransport) {}

  /** Resets the card and selects the purse application; returns the ATR. */
  async connect(): Promise<Buffer> {
    // No presence check first: reset() says why a card cannot be reached (which reader, what to do).
    this.atr = await this.transport.reset();
    expectOk(await exchange(this.transport, selectCommand(PURSE_AID)), "SELECT purse");
    return this.atr;
  }

  get answerToReset(): Buffer {
    if (!this.atr) throw new Error("card not connected");
    return this.atr;
  }

  /** READ PURSE of the money purse. */
  async readPurse(): Promise<PurseData> {
    const data = expectOk(
      await exchange(this.transport, { cla: PURSE_CLA, ins: PurseIns.READ_PURSE, p1: 0, p2: 0, data: Buffer.alloc(0), le: 256 }),
      "READ PURSE",
    );
    return ReadPurseResponse.decode(data);
  }

  /** The card's points purses (READ PURSE P1 = 1, 2, ... until 6A83), in the card's order; each one's currency is its programme code. */
  async readPointsPurses(): Promise<PurseData[]> {
    const out: PurseData[] = [];
    for (let n = 1; n <= 255; n++) {
      const r = await exchange(this.transport, { cla: PURSE_CLA, ins: PurseIns.READ_PURSE, p1: n, p2: 0, data: Buffer.alloc(0), le: 256 });
      if (r.sw === SW.RECORD_NOT_FOUND) break;
      out.push(ReadPurseResponse.decode(expectOk(r, `READ PURSE ${n}`)));
    }
    return out;
  }

  /**
   * INITIALIZE FOR PURCHASE: the raw response data (for the draw request) and
   * its parsed view. Without a currency the money purse; with one, the purse
   * of that currency: the money currency, AUTHENTICATION_CURRENCY (999) for
   * an authentication, or a programme code for its points purse (6A88 when
   * the card holds none).
   */
  async initializeForPurchase(currency?: number): Promise<{ raw: Buffer; parsed: InitializeForPurchase }> {
    const data = currency === undefined ? Buffer.alloc(0) : PurchaseSelector.encode({ currency });
    const raw = expectOk(
      await exchange(this.transport, { cla: PURSE_CLA, ins: PurseIns.INITIALIZE_FOR_PURCHASE, p1: 0, p2: 0, data, le: 256 }),
      "INITIALIZE FOR PURCHASE",
    );
    return { raw, parsed: InitializeForPurchaseResponse.decode(raw) };
  }

  /** DEBIT: returns the card's status word and, on 9000, its raw and parsed answer. */
  async debit(debitCommand: Buffer): Promise<{ sw: number; raw: Buffer; parsed?: DebitAnswer }> {
    const r = await exchange(this.transport, { cla: PURSE_CLA, ins: PurseIns.DEBIT, p1: 0, p2: 0, data: debitCommand, le: 256 });
    if (r.sw !== SW.OK) return { sw: r.sw, raw: Buffer.alloc(0) };
    if (r.data.length !== DebitResponse.size) throw new Error(`card's DEBIT response is ${r.data.length} bytes, expected ${DebitResponse.size}`);
    return { sw: r.sw, raw: r.data, parsed: DebitResponse.decode(r.data) };
  }

  /** INITIALIZE FOR LOAD: the raw response data (for the load request) and its parsed view, S1 included. */
  async initializeForLoad(command: LoadInitCommand): Promise<{ raw: Buffer; parsed: LoadInit }> {
    const raw = expectOk(
      await exchange(this.transport, {
        cla: PURSE_CLA,
        ins: PurseIns.INITIALIZE_FOR_LOAD,
        p1: 0,
        p2: 0,
        data: InitializeForLoadCommand.encode(command),
        le: 256,
      }),
      "INITIALIZE FOR LOAD",
    );
    return { raw, parsed: InitializeForLoadResponse.decode(raw) };
  }

  /** LOAD: returns the card's status word and, on 9000, its raw and parsed answer (which may be a negative result). */
  async load(loadCommand: Buffer): Promise<{ sw: number; raw: Buffer; parsed?: LoadAnswer }> {
    const r = await exchange(this.transport, { cla: PURSE_CLA, ins: PurseIns.LOAD, p1: 0, p2: 0, data: loadCommand, le: 256 });
    if (r.sw !== SW.OK) return { sw: r.sw, raw: Buffer.alloc(0) };
    if (r.data.length !== LoadResponse.size) throw new Error(`card's LOAD response is ${r.data.length} bytes, expected ${LoadResponse.size}`);
    return { sw: r.sw, raw: r.data, parsed: LoadResponse.decode(r.data) };
  }

  /** The card's log records as the card returns them, newest first. */
  async readLogRaw(limit = CARD_LOG_SIZE): Promise<Buffer[]> {
    const out: Buffer[] = [];
    for (let n = 1; n <= Math.min(limit, 255); n++) {
      const r = await exchange(this.transport, { cla: PURSE_CLA, ins: PurseIns.READ_LOG, p1: n, p2: 0, data: Buffer.alloc(0), le: 256 });
      if (r.sw === SW.RECORD_NOT_FOUND) break;
      out.push(expectOk(r, `READ LOG ${n}`));
    }
    return out;
  }

  /** The card's log, newest first. */
  async readLog(limit = CARD_LOG_SIZE): Promise<CardLogRecord[]> {
    return (await this.readLogRaw(limit)).map((r) => LogRecord.decode(r));
  }
}

/** Step 618: the client puts the merchant's original amount back into the DEBIT command. */
export function withOriginalAmount(debitCommand: Buffer, amount: number): Buffer {
  if (debitCommand.length !== DebitCommand.size) throw new Error(`DEBIT command must be ${DebitCommand.size} bytes, got ${debitCommand.length}`);
  const out = Buffer.from(debitCommand);
  out.writeUInt32BE(amount, DebitCommand.offset("amount"));
  return out;
}

// The software stored-value card: the purse application of docs/apdu.md,
// with its state in a private file made durable before every answer that
// changes it (a real card writes its EEPROM before it answers, too): a JSON
// snapshot and a log of changes beside it (lib/apdu/state-log.ts).

import { freshBytes } from "../../lib/crypto/random.js";
import { ApduError, buildAtr, status, SW, type CommandApdu, type ResponseApdu } from "../../lib/apdu/apdu.js";
import { SoftwareApplication } from "../../lib/apdu/software-application.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { deriveSessionKey } from "../../lib/crypto/keys.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import {
  InitializeForLoadCommand,
  InitializeForLoadResponse,
  LoadCommand,
  LoadResponse,
  LoadResult,
  loadS1,
  loadS2,
  loadS3,
  type LoadInit,
  type LoadInitCommand,
} from "../../lib/protocol/load.js";
import {
  ALGORITHM_AES128_CMAC,
  cardSignature,
  DebitCommand,
  DebitResponse,
  DebitResult,
  InitializeForPurchaseResponse,
  isExpired,
  LogKind,
  LogRecord,
  PURSE_AID,
  PURSE_ATR_HISTORICAL,
  PURSE_CLA,
  PURSE_FORMAT,
  PurseIns,
  PurseStatusByte,
  psamSignature,
  purchaseCryptogram,
  ReadPurseResponse,
  type CardSession,
  type CardLogRecord,
} from "../../lib/protocol/purse.js";

/** How many transactions the card's log keeps. */
export const CARD_LOG_SIZE = 32;

/** A log entry as stored in the card file (byte fields in hex). */
export interface CardLogEntry {
  kind: number;
  counter: number;
  amount: number;
  currency: number;
  balance: number;
  moduleId: string;
  moduleCounter: number;
  dateTime: number;
  transactionRef: string;
  cardSignature: string;
}

/** The card file: everything the chip would hold. Private (mode 0600): it holds the card's keys. */
export interface CardFile {
  format: 1;
  providerId: string;
  purseId: string;
  currency: number;
  exponent: number;
  balance: number;
  maxBalance: number;
  expiry: string;
  counter: number;
  keyVersion: number;
  status: "active" | "blocked";
  /** Keys diversified for this card, per purpose, hex. */
  keys: { purchase: string; load: string; authentication: string };
  /** Newest first. */
  log: CardLogEntry[];
}

interface PurchaseSession extends CardSession {
  kind: "purchase";
}

/** A load session: what INITIALIZE FOR LOAD was asked and answered, S1 included. */
interface LoadSession {
  kind: "load";
  command: LoadInitCommand;
  init: LoadInit;
}

export class SoftwareCard extends SoftwareApplication<CardFile> {
  private selected = false;
  // One session at a time: a new INITIALIZE of either kind ends the last one.
  private session: PurchaseSession | LoadSession | undefined;

  static async open(path: string): Promise<SoftwareCard> {
    return new SoftwareCard(path, await SoftwareApplication.load<CardFile>(path, "card"));
  }

  /** Writes a new card file (personalisation). */
  static async write(path: string, file: CardFile): Promise<void> {
    await SoftwareApplication.store(path, file);
  }

  static readonly ATR = buildAtr(PURSE_ATR_HISTORICAL);

  reset(): Buffer {
    this.selected = false;
    this.session = undefined;
    return SoftwareCard.ATR;
  }

  protected async dispatch(c: CommandApdu): Promise<ResponseApdu> {
    if (c.cla === 0x00 && c.ins === 0xa4) return this.select(c);
    if (c.cla !== PURSE_CLA) return status(SW.CLA_NOT_SUPPORTED);
    if (!this.selected) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "purse application not selected");
    switch (c.ins) {
      case PurseIns.INITIALIZE_FOR_PURCHASE:
        return this.initializeForPurchase(c);
      case PurseIns.INITIALIZE_FOR_LOAD:
        return this.initializeForLoad(c);
      case PurseIns.LOAD:
        return this.load(c);
      case PurseIns.DEBIT:
        return this.debit(c);
      case PurseIns.READ_PURSE:
        return this.readPurse(c);
      case PurseIns.READ_LOG:
        return this.readLog(c);
      default:
        return status(SW.INS_NOT_SUPPORTED);
    }
  }

  private select(c: CommandApdu): ResponseApdu {
    if (c.p1 !== 0x04) return status(SW.WRONG_P1P2);
    if (!c.data.equals(PURSE_AID)) {
      this.selected = false;
      return status(SW.FILE_NOT_FOUND);
    }
    this.selected = true;
    this.session = undefined;
    return status(SW.OK);
  }

  private initializeForPurchase(c: CommandApdu): ResponseApdu {
    if (c.p1 !== 0 || c.p2 !== 0) return status(SW.WRONG_P1P2);
    if (c.data.length !== 0) return status(SW.WRONG_LENGTH);
    const s = this.state;
    const challenge = freshBytes(8);
    const purseId = Buffer.from(s.purseId, "hex");
    this.session = { kind: "purchase", purseId, cardCounter: s.counter, challenge };
    const answer = {
      format: PURSE_FORMAT,
      providerId: Buffer.from(s.providerId, "hex"),
      purseId,
      currency: s.currency,
      exponent: s.exponent,
      balance: s.balance,
      expiry: s.expiry,
      counter: s.counter,
      keyVersion: s.keyVersion,
      algorithm: ALGORITHM_AES128_CMAC,
      status: s.status === "blocked" ? PurseStatusByte.BLOCKED : PurseStatusByte.ACTIVE,
      challenge,
    };
    // The cryptogram proves to the PSAM that this card, holding its purchase key, gave exactly this answer.
    const cryptogram = purchaseCryptogram(Buffer.from(s.keys.purchase, "hex"), answer);
    return { data: InitializeForPurchaseResponse.encode({ ...answer, cryptogram }), sw: SW.OK };
  }

  private async debit(c: CommandApdu): Promise<ResponseApdu> {
    const session = this.session;
    // A DEBIT ends the session whatever happens: a replay finds none.
    this.session = undefined;
    if (session?.kind !== "purchase") throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "no purchase session: INITIALIZE FOR PURCHASE first");
    if (c.data.length !== DebitCommand.size) throw new ApduError(SW.WRONG_LENGTH, "DEBIT data length");
    const d = decodeOr6A80(() => DebitCommand.decode(c.data));
    const s = this.state;
    const sessionKey = deriveSessionKey(Buffer.from(s.keys.purchase, "hex"), {
      cardCounter: session.cardCounter,
      securityModuleId: d.psamId,
      securityModuleCounter: d.psamCounter,
      challenge: session.challenge,
    });
    if (!macEqual(psamSignature(sessionKey, session, d), d.psamSignature)) {
      throw new ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, "PSAM signature does not verify");
    }
    if (s.counter >= 0xffffffff) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "transaction counter exhausted");

    let result: number = DebitResult.DEBITED;
    if (d.currency !== s.currency) result = DebitResult.CURRENCY_MISMATCH;
    else if (s.status === "blocked") result = DebitResult.BLOCKED;
    else if (isExpired(s.expiry, new Date(d.dateTime * 1000))) result = DebitResult.EXPIRED;
    else if (d.amount > s.balance) result = DebitResult.INSUFFICIENT_BALANCE;

    const answer = { result, counter: s.counter, balance: s.balance };
    if (result === DebitResult.DEBITED) {
      answer.counter = s.counter + 1;
      answer.balance = s.balance - d.amount;
    }
    const signature = cardSignature(sessionKey, session, d, answer);
    if (result === DebitResult.DEBITED) {
      const entry: CardLogEntry = {
        kind: LogKind.PURCHASE,
        counter: answer.counter,
        amount: d.amount,
        currency: d.currency,
        balance: answer.balance,
        moduleId: d.psamId.toString("hex"),
        moduleCounter: d.psamCounter,
        dateTime: d.dateTime,
        transactionRef: d.transactionRef,
        cardSignature: signature.toString("hex"),
      };
      await this.save({ ...s, balance: answer.balance, counter: answer.counter, log: [entry, ...s.log].slice(0, CARD_LOG_SIZE) }); // before the card answers
    }
    return { data: DebitResponse.encode({ ...answer, cardSignature: signature }), sw: SW.OK };
  }

  /** INITIALIZE FOR LOAD: the purse state, a fresh challenge and S1. Changes nothing; a zero amount is how a client proves a load did not happen. */
  private initializeForLoad(c: CommandApdu): ResponseApdu {
    if (c.p1 !== 0 || c.p2 !== 0) return status(SW.WRONG_P1P2);
    this.session = undefined;
    if (c.data.length !== InitializeForLoadCommand.size) throw new ApduError(SW.WRONG_LENGTH, "INITIALIZE FOR LOAD data length");
    const command = decodeOr6A80(() => InitializeForLoadCommand.decode(c.data));
    const state = { ...this.purse(), algorithm: ALGORITHM_AES128_CMAC, challenge: freshBytes(8) };
    const init = { ...state, s1: loadS1(Buffer.from(this.state.keys.load, "hex"), command, state) };
    this.session = { kind: "load", command, init };
    return { data: InitializeForLoadResponse.encode(init), sw: SW.OK };
  }

  /** LOAD: verifies S2, credits the amount INITIALIZE FOR LOAD named, logs the credit with S3, and answers with the result and S3. */
  private async load(c: CommandApdu): Promise<ResponseApdu> {
    const session = this.session;
    // A LOAD ends the session whatever happens: a replay finds none.
    this.session = undefined;
    if (session?.kind !== "load") throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "no load session: INITIALIZE FOR LOAD first");
    if (c.data.length !== LoadCommand.size) throw new ApduError(SW.WRONG_LENGTH, "LOAD data length");
    const l = decodeOr6A80(() => LoadCommand.decode(c.data));
    const asked = session.command;
    if (l.amount !== asked.amount || l.currency !== asked.currency || l.dateTime !== asked.dateTime || l.transactionRef !== asked.transactionRef) {
      throw new ApduError(SW.WRONG_DATA, "LOAD does not match INITIALIZE FOR LOAD");
    }
    const s = this.state;
    const sessionKey = deriveSessionKey(Buffer.from(s.keys.load, "hex"), {
      cardCounter: session.init.counter,
      securityModuleId: l.hsmId,
      securityModuleCounter: l.hsmCounter,
      challenge: session.init.challenge,
    });
    if (!macEqual(loadS2(sessionKey, session.init, l), l.s2))
      throw new ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, "security module signature S2 does not verify");
    if (s.counter >= 0xffffffff) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "transaction counter exhausted");

    let result: number = LoadResult.LOADED;
    if (l.currency !== s.currency) result = LoadResult.CURRENCY_MISMATCH;
    else if (s.status === "blocked") result = LoadResult.BLOCKED;
    else if (isExpired(s.expiry, new Date(l.dateTime * 1000))) result = LoadResult.EXPIRED;
    else if (s.balance + l.amount > s.maxBalance) result = LoadResult.MAX_BALANCE_EXCEEDED;

    const answer =
      result === LoadResult.LOADED ? { result, counter: s.counter + 1, balance: s.balance + l.amount } : { result, counter: s.counter, balance: s.balance };
    const s3 = loadS3(sessionKey, session.init, l, answer);
    if (result === LoadResult.LOADED) {
      const entry: CardLogEntry = {
        kind: LogKind.LOAD,
        counter: answer.counter,
        amount: l.amount,
        currency: l.currency,
        balance: answer.balance,
        moduleId: l.hsmId.toString("hex"),
        moduleCounter: l.hsmCounter,
        dateTime: l.dateTime,
        transactionRef: l.transactionRef,
        cardSignature: s3.toString("hex"),
      };
      await this.save({ ...s, balance: answer.balance, counter: answer.counter, log: [entry, ...s.log].slice(0, CARD_LOG_SIZE) }); // before the card answers
    }
    return { data: LoadResponse.encode({ ...answer, s3 }), sw: SW.OK };
  }

  private readPurse(c: CommandApdu): ResponseApdu {
    if (c.p1 !== 0 || c.p2 !== 0) return status(SW.WRONG_P1P2);
    return { data: ReadPurseResponse.encode(this.purse()), sw: SW.OK };
  }

  /** The purse state as READ PURSE and INITIALIZE FOR LOAD report it. */
  private purse() {
    const s = this.state;
    return {
      format: PURSE_FORMAT,
      providerId: Buffer.from(s.providerId, "hex"),
      purseId: Buffer.from(s.purseId, "hex"),
      currency: s.currency,
      exponent: s.exponent,
      balance: s.balance,
      maxBalance: s.maxBalance,
      expiry: s.expiry,
      counter: s.counter,
      keyVersion: s.keyVersion,
      status: s.status === "blocked" ? PurseStatusByte.BLOCKED : PurseStatusByte.ACTIVE,
    };
  }

  /** READ LOG: P1 = record number, 1 being the newest. */
  private readLog(c: CommandApdu): ResponseApdu {
    if (c.p1 < 1 || c.p2 !== 0) return status(SW.WRONG_P1P2);
    const e = this.state.log[c.p1 - 1];
    if (!e) return status(SW.RECORD_NOT_FOUND);
    const record: CardLogRecord = {
      ...e,
      moduleId: Buffer.from(e.moduleId, "hex"),
      cardSignature: Buffer.from(e.cardSignature, "hex"),
    };
    return { data: LogRecord.encode(record), sw: SW.OK };
  }
}

/** A command's data that does not parse is the card's 6A80. */
function decodeOr6A80<T>(decode: () => T): T {
  try {
    return decode();
  } catch (e) {
    if (e instanceof LayoutError) throw new ApduError(SW.WRONG_DATA, e.message);
    throw e;
  }
}

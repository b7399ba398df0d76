// The software stored-value card: the purse application of docs/apdu.md,
// with its state in a private file made durable before every answer that
// changes it (a real card writes its EEPROM before it answers, too): a JSON
// snapshot and a log of changes beside it (lib/apdu/state-log.ts).
// Beside the money purse it answers as its authentication application
// (currency 999) and as one points purse per loyalty programme it holds
// (docs/loyalty.md): each with its own keys, one transaction counter for all.

import { freshBytes } from "../../lib/crypto/random.js";
import { ApduError, buildAtr, status, SW, type CommandApdu, type ResponseApdu } from "../../lib/apdu/apdu.js";
import { SoftwareApplication } from "../../lib/apdu/software-application.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { deriveSessionKey } from "../../lib/crypto/keys.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import { AUTHENTICATION_CURRENCY, isProgrammeCode } from "../../lib/money.js";
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
  PurchaseSelector,
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
  /** The card's points purses, one per loyalty programme, in READ PURSE order (P1 = 1, 2, ...). */
  points?: PointsPurseFile[];
}

/** A points purse in the card file: its programme's points (exponent 0), and its keys. */
export interface PointsPurseFile {
  /** The programme's code, 1000..65535: it stands where a currency stands. */
  programme: number;
  balance: number;
  maxBalance: number;
  /** Diversified by purse id from the programme's redeem and earn master keys of the card's key version, hex. */
  keys: { redeem: string; earn: string };
}

/** Which of the card's applications a session is on: the money purse, the authentication application, or a programme's points purse. */
type PurseRef = { kind: "money" } | { kind: "authentication" } | { kind: "points"; programme: number };
/** The purses a LOAD can credit. */
type LoadablePurse = Exclude<PurseRef, { kind: "authentication" }>;

interface PurchaseSession extends CardSession {
  kind: "purchase";
  purse: PurseRef;
}

/** A load session: what INITIALIZE FOR LOAD was asked and answered, S1 included. */
interface LoadSession {
  kind: "load";
  purse: LoadablePurse;
  command: LoadInitCommand;
  init: LoadInit;
}

/** One purse's unit, balance and keys as the commands see it. */
interface PurseView {
  currency: number;
  exponent: number;
  balance: number;
  maxBalance: number;
  /** Key of its purchase session (cryptogram, DEBIT). */
  debitKey: string;
}

export class SoftwareCard extends SoftwareApplication<CardFile> {
  private selected = false;
  // One session at a time: a new INITIALIZE of either kind ends the last one.
  private session: PurchaseSession | LoadSession | undefined;

  static async open(path: string): Promise<SoftwareCard> {
    return new SoftwareCard(path, await SoftwareApplication.load<CardFile>(path, "card", (state) => checkPoints(path, state.points ?? [])));
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

  /** INITIALIZE FOR PURCHASE: data empty or a 2-byte currency selector naming the purse (money, 999 authentication, a programme code). */
  private initializeForPurchase(c: CommandApdu): ResponseApdu {
    if (c.p1 !== 0 || c.p2 !== 0) return status(SW.WRONG_P1P2);
    if (c.data.length !== 0 && c.data.length !== PurchaseSelector.size) return status(SW.WRONG_LENGTH);
    this.session = undefined;
    const s = this.state;
    const purse = c.data.length === 0 ? MONEY : this.purseFor(PurchaseSelector.decode(c.data).currency);
    if (!purse) throw new ApduError(SW.REFERENCED_DATA_NOT_FOUND, "no purse of this currency on the card");
    const v = this.view(purse);
    const challenge = freshBytes(8);
    const purseId = Buffer.from(s.purseId, "hex");
    this.session = { kind: "purchase", purse, purseId, cardCounter: s.counter, challenge };
    const answer = {
      format: PURSE_FORMAT,
      providerId: Buffer.from(s.providerId, "hex"),
      purseId,
      currency: v.currency,
      exponent: v.exponent,
      balance: v.balance,
      expiry: s.expiry,
      counter: s.counter,
      keyVersion: s.keyVersion,
      algorithm: ALGORITHM_AES128_CMAC,
      status: s.status === "blocked" ? PurseStatusByte.BLOCKED : PurseStatusByte.ACTIVE,
      challenge,
    };
    // The cryptogram proves to the PSAM that this card, holding this purse's key, gave exactly this answer.
    const cryptogram = purchaseCryptogram(Buffer.from(v.debitKey, "hex"), answer);
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
    const v = this.view(session.purse);
    const sessionKey = deriveSessionKey(Buffer.from(v.debitKey, "hex"), {
      cardCounter: session.cardCounter,
      securityModuleId: d.psamId,
      securityModuleCounter: d.psamCounter,
      challenge: session.challenge,
    });
    if (!macEqual(psamSignature(sessionKey, session, d), d.psamSignature)) {
      throw new ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, "PSAM signature does not verify");
    }
    // An authentication moves no value: a non-zero amount is not an authentication the card signs.
    if (session.purse.kind === "authentication" && d.amount !== 0) throw new ApduError(SW.WRONG_DATA, "an authentication's amount must be 0");
    if (s.counter >= 0xffffffff) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "transaction counter exhausted");

    let result: number = DebitResult.DEBITED;
    if (d.currency !== v.currency) result = DebitResult.CURRENCY_MISMATCH;
    else if (s.status === "blocked") result = DebitResult.BLOCKED;
    else if (isExpired(s.expiry, new Date(d.dateTime * 1000))) result = DebitResult.EXPIRED;
    else if (d.amount > v.balance) result = DebitResult.INSUFFICIENT_BALANCE;

    const answer = { result, counter: s.counter, balance: v.balance };
    if (result === DebitResult.DEBITED) {
      answer.counter = s.counter + 1;
      answer.balance = v.balance - d.amount;
    }
    const signature = cardSignature(sessionKey, session, d, answer);
    if (result === DebitResult.DEBITED) {
      const entry: CardLogEntry = {
        kind: DEBIT_LOG_KIND[session.purse.kind],
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
      await this.save({ ...this.withBalance(session.purse, answer.balance), counter: answer.counter, log: [entry, ...s.log].slice(0, CARD_LOG_SIZE) }); // before the card answers
    }
    return { data: DebitResponse.encode({ ...answer, cardSignature: signature }), sw: SW.OK };
  }

  /**
   * INITIALIZE FOR LOAD: the purse state, a fresh challenge and S1. Changes
   * nothing; a zero amount is how a client proves a load did not happen. A
   * programme code the card holds as the command's currency opens that
   * points purse (S1 under its earn key); anything else the money purse.
   */
  private initializeForLoad(c: CommandApdu): ResponseApdu {
    if (c.p1 !== 0 || c.p2 !== 0) return status(SW.WRONG_P1P2);
    this.session = undefined;
    if (c.data.length !== InitializeForLoadCommand.size) throw new ApduError(SW.WRONG_LENGTH, "INITIALIZE FOR LOAD data length");
    const command = decodeOr6A80(() => InitializeForLoadCommand.decode(c.data));
    const purse: LoadablePurse = this.pointsPurse(command.currency) ? { kind: "points", programme: command.currency } : MONEY;
    const state = { ...this.purse(purse), algorithm: ALGORITHM_AES128_CMAC, challenge: freshBytes(8) };
    const init = { ...state, s1: loadS1(this.creditKey(purse), command, state) };
    this.session = { kind: "load", purse, command, init };
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
    const v = this.view(session.purse);
    const sessionKey = deriveSessionKey(this.creditKey(session.purse), {
      cardCounter: session.init.counter,
      securityModuleId: l.hsmId,
      securityModuleCounter: l.hsmCounter,
      challenge: session.init.challenge,
    });
    if (!macEqual(loadS2(sessionKey, session.init, l), l.s2))
      throw new ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, "security module signature S2 does not verify");
    if (s.counter >= 0xffffffff) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "transaction counter exhausted");

    let result: number = LoadResult.LOADED;
    if (l.currency !== v.currency) result = LoadResult.CURRENCY_MISMATCH;
    else if (s.status === "blocked") result = LoadResult.BLOCKED;
    else if (isExpired(s.expiry, new Date(l.dateTime * 1000))) result = LoadResult.EXPIRED;
    else if (v.balance + l.amount > v.maxBalance) result = LoadResult.MAX_BALANCE_EXCEEDED;

    const answer =
      result === LoadResult.LOADED ? { result, counter: s.counter + 1, balance: v.balance + l.amount } : { result, counter: s.counter, balance: v.balance };
    const s3 = loadS3(sessionKey, session.init, l, answer);
    if (result === LoadResult.LOADED) {
      const entry: CardLogEntry = {
        kind: session.purse.kind === "points" ? LogKind.POINTS_CREDIT : LogKind.LOAD,
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
      await this.save({ ...this.withBalance(session.purse, answer.balance), counter: answer.counter, log: [entry, ...s.log].slice(0, CARD_LOG_SIZE) }); // before the card answers
    }
    return { data: LoadResponse.encode({ ...answer, s3 }), sw: SW.OK };
  }

  /** READ PURSE: P1 = 0 the money purse, P1 = n the n-th points purse; 6A83 past the last. */
  private readPurse(c: CommandApdu): ResponseApdu {
    if (c.p2 !== 0) return status(SW.WRONG_P1P2);
    if (c.p1 === 0) return { data: ReadPurseResponse.encode(this.purse(MONEY)), sw: SW.OK };
    const p = (this.state.points ?? [])[c.p1 - 1];
    if (!p) return status(SW.RECORD_NOT_FOUND);
    return { data: ReadPurseResponse.encode(this.purse({ kind: "points", programme: p.programme })), sw: SW.OK };
  }

  /** The purse a currency selects: the money currency, 999, or a programme code the card holds; undefined for any other. */
  private purseFor(currency: number): PurseRef | undefined {
    if (currency === this.state.currency) return MONEY;
    if (currency === AUTHENTICATION_CURRENCY) return { kind: "authentication" };
    return this.pointsPurse(currency) ? { kind: "points", programme: currency } : undefined;
  }

  private pointsPurse(programme: number): PointsPurseFile | undefined {
    return isProgrammeCode(programme) ? (this.state.points ?? []).find((p) => p.programme === programme) : undefined;
  }

  private view(ref: PurseRef): PurseView {
    const s = this.state;
    switch (ref.kind) {
      case "money":
        return { currency: s.currency, exponent: s.exponent, balance: s.balance, maxBalance: s.maxBalance, debitKey: s.keys.purchase };
      case "authentication":
        return { currency: AUTHENTICATION_CURRENCY, exponent: 0, balance: 0, maxBalance: 0, debitKey: s.keys.authentication };
      case "points": {
        const p = this.pointsPurse(ref.programme);
        if (!p) throw new Error(`points purse ${ref.programme} vanished from the card`);
        return { currency: p.programme, exponent: 0, balance: p.balance, maxBalance: p.maxBalance, debitKey: p.keys.redeem };
      }
    }
  }

  /** Key of a purse's load session (S1, LOAD): the money purse's load key, a points purse's earn key. */
  private creditKey(ref: LoadablePurse): Buffer {
    if (ref.kind === "money") return Buffer.from(this.state.keys.load, "hex");
    const p = this.pointsPurse(ref.programme);
    if (!p) throw new Error(`points purse ${ref.programme} vanished from the card`);
    return Buffer.from(p.keys.earn, "hex");
  }

  /** The card file with a purse's new balance (the authentication application has none). */
  private withBalance(ref: PurseRef, balance: number): CardFile {
    const s = this.state;
    if (ref.kind === "money") return { ...s, balance };
    if (ref.kind === "authentication") return s;
    return { ...s, points: (s.points ?? []).map((p) => (p.programme === ref.programme ? { ...p, balance } : p)) };
  }

  /** A purse's state as READ PURSE and INITIALIZE FOR LOAD report it. */
  private purse(ref: PurseRef) {
    const s = this.state;
    const v = this.view(ref);
    return {
      format: PURSE_FORMAT,
      providerId: Buffer.from(s.providerId, "hex"),
      purseId: Buffer.from(s.purseId, "hex"),
      currency: v.currency,
      exponent: v.exponent,
      balance: v.balance,
      maxBalance: v.maxBalance,
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

const MONEY = { kind: "money" } as const satisfies PurseRef;

const DEBIT_LOG_KIND = { money: LogKind.PURCHASE, authentication: LogKind.AUTHENTICATION, points: LogKind.POINTS_REDEMPTION } as const;

/** Refuses a card file whose points purses a command could not tell apart or count in. */
function checkPoints(path: string, points: PointsPurseFile[]): void {
  const seen = new Set<number>();
  for (const p of points) {
    if (!isProgrammeCode(p.programme)) throw new Error(`${path}: points purse of ${p.programme}: not a programme code (1000..65535)`);
    if (seen.has(p.programme)) throw new Error(`${path}: two points purses of programme ${p.programme}`);
    seen.add(p.programme);
  }
  if (points.length > 255) throw new Error(`${path}: more points purses than READ PURSE can name (255)`);
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

// The software PSAM: the purchase security application module of docs/apdu.md.
// It holds the issuer's purchase master keys (by version), checks the card,
// signs the DEBIT command, verifies the card's signature and keeps the batch.
// Its state is a private JSON file written atomically before every answer
// that changes it.

import { ApduError, buildAtr, status, SW, type CommandApdu, type ResponseApdu } from "../../../lib/apdu/apdu.js";
import { SoftwareApplication } from "../../../lib/apdu/software-application.js";
import { macEqual } from "../../../lib/crypto/aes.js";
import { deriveSessionKey, diversifyCardKey } from "../../../lib/crypto/keys.js";
import { LayoutError, type Layout } from "../../../lib/protocol/layout.js";
import {
  batchMac,
  batchRecordMac,
  BatchRecord,
  CloseBatchResponse,
  DRAW_P1_RETURN_EXPECTED_SIGNATURE,
  DrawAmountCommand,
  PendingDebitRecord,
  PSAM_AID,
  PSAM_ATR_HISTORICAL,
  PSAM_CLA,
  PsamIns,
  PsamStatusResponse,
  ReverseDebitCommand,
  Verdict,
  VerifyDebitCommand,
  VerifyDebitResponse,
} from "../../../lib/protocol/psam.js";
import {
  ALGORITHM_AES128_CMAC,
  cardSignature,
  DebitCommand,
  DebitResponse,
  DebitResult,
  InitializeForPurchaseResponse,
  isExpired,
  PURSE_FORMAT,
  PurseStatusByte,
  psamSignature,
  type InitializeForPurchase,
} from "../../../lib/protocol/purse.js";

/** A debit the PSAM signed that is neither proven nor reversed. */
export interface PendingDebitState {
  psamCounter: number;
  purseId: string;
  keyVersion: number;
  cardCounter: number;
  challenge: string;
  balanceBefore: number;
  amount: number;
  currency: number;
  dateTime: number;
  transactionRef: string;
  merchantId: string;
}

export interface BatchRecordState {
  psamCounter: number;
  purseId: string;
  cardCounter: number;
  amount: number;
  currency: number;
  dateTime: number;
  transactionRef: string;
  merchantId: string;
  cardSignature: string;
  recordMac: string;
}

/** The PSAM file. Private (mode 0600): it holds the issuer's purchase master keys. */
export interface PsamFile {
  format: 1;
  psamId: string;
  /** The one currency this PSAM accepts (ISO 4217 numeric); its batches are totalled in it. */
  currency: number;
  /** Purchase master keys by key version, hex. */
  purchaseKeys: Record<string, string>;
  /** Key for the MACs over batch records and closed batches, hex. */
  batchKey: string;
  /** Most records (open debits included) before the batch must be closed. */
  batchCapacity: number;
  counter: number;
  batchNumber: number;
  batch: BatchRecordState[];
  pending: PendingDebitState[];
  /** Purse ids (hex) the issuer has blocked. */
  blockedPurses: string[];
  /** PSAM counters of the last debits cancelled (reversed or declined by the card), so a retried REVERSE is answered alike. */
  reversed: number[];
}

const REVERSED_KEPT = 256;

interface Session {
  atr: Buffer;
  card?: InitializeForPurchase;
}

function decode<T>(l: Layout<any>, data: Buffer): T {
  if (data.length !== l.size) throw new ApduError(SW.WRONG_LENGTH, `${l.name} must be ${l.size} bytes`);
  try {
    return l.decode(data) as T;
  } catch (e) {
    if (e instanceof LayoutError) throw new ApduError(SW.WRONG_DATA, e.message);
    throw e;
  }
}

export class SoftwarePsam extends SoftwareApplication<PsamFile> {
  static readonly ATR = buildAtr(PSAM_ATR_HISTORICAL);
  private selected = false;
  private session: Session | undefined;

  private constructor(
    path: string,
    state: PsamFile,
    private readonly clock: () => Date,
  ) {
    super(path, state);
  }

  static async open(path: string, clock: () => Date = () => new Date()): Promise<SoftwarePsam> {
    return new SoftwarePsam(path, await SoftwareApplication.load<PsamFile>(path, "PSAM"), clock);
  }

  static async write(path: string, file: PsamFile): Promise<void> {
    await SoftwareApplication.store(path, file);
  }

  get psamId(): string {
    return this.state.psamId;
  }

  get keyVersions(): number[] {
    return Object.keys(this.state.purchaseKeys).map(Number);
  }

  get currency(): number {
    return this.state.currency;
  }

  reset(): Buffer {
    this.selected = false;
    this.session = undefined;
    return SoftwarePsam.ATR;
  }

  protected async dispatch(c: CommandApdu): Promise<ResponseApdu> {
    if (c.cla === 0x00 && c.ins === 0xa4) {
      this.selected = c.p1 === 0x04 && c.data.equals(PSAM_AID);
      this.session = undefined;
      return status(this.selected ? SW.OK : SW.FILE_NOT_FOUND);
    }
    if (c.cla !== PSAM_CLA) return status(SW.CLA_NOT_SUPPORTED);
    if (!this.selected) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "PSAM application not selected");
    switch (c.ins) {
      case PsamIns.CARD_RESET:
        return this.cardReset(c);
      case PsamIns.INITIALIZE:
        return this.initialize(c);
      case PsamIns.DRAW_AMOUNT:
        return this.drawAmount(c);
      case PsamIns.VERIFY_DEBIT:
        return this.verifyDebit(c);
      case PsamIns.REVERSE_DEBIT:
        return this.reverseDebit(c);
      case PsamIns.READ_STATUS:
        return this.readStatus();
      case PsamIns.READ_PENDING:
        return this.readPending(c);
      case PsamIns.READ_BATCH_RECORD:
        return this.readBatchRecord(c);
      case PsamIns.CLOSE_BATCH:
        return this.closeBatch();
      default:
        return status(SW.INS_NOT_SUPPORTED);
    }
  }

  /** CARD RESET: a card was "inserted"; its ATR starts a new session. */
  private cardReset(c: CommandApdu): ResponseApdu {
    const atr = c.data;
    if (atr.length < 2 || atr.length > 33) throw new ApduError(SW.WRONG_LENGTH, "ATR must be 2..33 bytes");
    if (atr[0] !== 0x3b && atr[0] !== 0x3f) throw new ApduError(SW.WRONG_DATA, "ATR must start with TS 3B or 3F");
    this.session = { atr: Buffer.from(atr) };
    return status(SW.OK);
  }

  /** INITIALIZE: the card's response to INITIALIZE FOR PURCHASE; the PSAM checks the card. */
  private initialize(c: CommandApdu): ResponseApdu {
    if (!this.session) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "no card session: CARD RESET first");
    const card = decode<InitializeForPurchase>(InitializeForPurchaseResponse, c.data);
    this.session.card = undefined;
    if (card.format !== PURSE_FORMAT) throw new ApduError(SW.WRONG_DATA, "unknown card response format");
    if (card.algorithm !== ALGORITHM_AES128_CMAC) throw new ApduError(SW.FUNCTION_NOT_SUPPORTED, "card algorithm not supported");
    if (!(String(card.keyVersion) in this.state.purchaseKeys)) throw new ApduError(SW.REFERENCED_DATA_NOT_FOUND, "key version not held");
    if (card.status !== PurseStatusByte.ACTIVE || this.state.blockedPurses.includes(card.purseId.toString("hex"))) {
      throw new ApduError(SW.CARD_BLOCKED, "card blocked");
    }
    if (isExpired(card.expiry, this.clock())) throw new ApduError(SW.CARD_EXPIRED, "card expired");
    if (card.currency !== this.state.currency) throw new ApduError(SW.CURRENCY_NOT_ACCEPTED, "currency not accepted");
    this.session.card = card;
    return status(SW.OK);
  }

  private sessionKey(p: { purseId: Buffer; keyVersion: number; cardCounter: number; psamCounter: number; challenge: Buffer }): Buffer {
    const master = Buffer.from(this.state.purchaseKeys[String(p.keyVersion)]!, "hex");
    return deriveSessionKey(diversifyCardKey(master, p.purseId), {
      cardCounter: p.cardCounter,
      securityModuleId: Buffer.from(this.state.psamId, "hex"),
      securityModuleCounter: p.psamCounter,
      challenge: p.challenge,
    });
  }

  /** DRAW AMOUNT: the merchant's amount; the PSAM signs and returns the card's DEBIT command. */
  private async drawAmount(c: CommandApdu): Promise<ResponseApdu> {
    const card = this.session?.card;
    if (!card) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "no initialized card: CARD RESET and INITIALIZE first");
    const draw = decode<ReturnType<typeof DrawAmountCommand.decode>>(DrawAmountCommand, c.data);
    if (draw.amount === 0) throw new ApduError(SW.AMOUNT_OUT_OF_RANGE, "amount must be positive");
    if (draw.currency !== card.currency) throw new ApduError(SW.CURRENCY_NOT_ACCEPTED, "amount currency is not the card's");
    if (draw.amount > card.balance) throw new ApduError(SW.INSUFFICIENT_BALANCE, "card balance lower than amount");
    const s = this.state;
    if (s.batch.length + s.pending.length >= s.batchCapacity) throw new ApduError(SW.BATCH_FULL, "batch full: close it first");
    if (s.counter >= 0xffffffff) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "PSAM counter exhausted");
    this.session = undefined; // one debit per card session

    const psamCounter = s.counter + 1;
    const dateTime = Math.floor(this.clock().getTime() / 1000);
    const cardSession = { purseId: card.purseId, cardCounter: card.counter, challenge: card.challenge };
    const sk = this.sessionKey({ ...cardSession, keyVersion: card.keyVersion, psamCounter });
    const fields = {
      amount: draw.amount,
      currency: draw.currency,
      psamId: Buffer.from(s.psamId, "hex"),
      psamCounter,
      dateTime,
      transactionRef: draw.transactionRef,
    };
    const debit = DebitCommand.encode({ ...fields, psamSignature: psamSignature(sk, cardSession, fields) });
    const pending: PendingDebitState = {
      psamCounter,
      purseId: card.purseId.toString("hex"),
      keyVersion: card.keyVersion,
      cardCounter: card.counter,
      challenge: card.challenge.toString("hex"),
      balanceBefore: card.balance,
      amount: draw.amount,
      currency: draw.currency,
      dateTime,
      transactionRef: draw.transactionRef,
      merchantId: draw.merchantId,
    };
    await this.save({ ...s, counter: psamCounter, pending: [...s.pending, pending] });
    if (c.p1 & DRAW_P1_RETURN_EXPECTED_SIGNATURE) {
      const expected = cardSignature(sk, cardSession, fields, {
        result: DebitResult.DEBITED,
        counter: card.counter + 1,
        balance: card.balance - draw.amount,
      });
      return { data: Buffer.concat([debit, expected]), sw: SW.OK };
    }
    return { data: debit, sw: SW.OK };
  }

  private pendingByCounter(psamCounter: number): PendingDebitState {
    const p = this.state.pending.find((x) => x.psamCounter === psamCounter);
    if (!p) throw new ApduError(SW.REFERENCED_DATA_NOT_FOUND, `no open debit with PSAM counter ${psamCounter}`);
    return p;
  }

  private cancelled(psamCounter: number): number[] {
    return [...this.state.reversed, psamCounter].slice(-REVERSED_KEPT);
  }

  /**
   * VERIFY DEBIT: the card's answer; a proven debit goes into the batch. A
   * retry for a debit already recorded in the current batch with the same
   * card signature gets the same answer.
   */
  private async verifyDebit(c: CommandApdu): Promise<ResponseApdu> {
    const v = decode<{ psamCounter: number; debitResponse: Buffer }>(VerifyDebitCommand, c.data);
    const answer = decode<ReturnType<typeof DebitResponse.decode>>(DebitResponse, v.debitResponse);
    const done = this.state.batch.find((r) => r.psamCounter === v.psamCounter);
    if (done && macEqual(Buffer.from(done.cardSignature, "hex"), answer.cardSignature)) {
      return { data: VerifyDebitResponse.encode({ verdict: Verdict.RECORDED, batchNumber: this.state.batchNumber, recordMac: Buffer.from(done.recordMac, "hex") }), sw: SW.OK };
    }
    if (this.state.reversed.includes(v.psamCounter)) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, `debit ${v.psamCounter} was cancelled`);
    const p = this.pendingByCounter(v.psamCounter);
    const purseId = Buffer.from(p.purseId, "hex");
    const cardSession = { purseId, cardCounter: p.cardCounter, challenge: Buffer.from(p.challenge, "hex") };
    const sk = this.sessionKey({ ...cardSession, keyVersion: p.keyVersion, psamCounter: p.psamCounter });
    const fields = {
      amount: p.amount,
      currency: p.currency,
      psamId: Buffer.from(this.state.psamId, "hex"),
      psamCounter: p.psamCounter,
      dateTime: p.dateTime,
      transactionRef: p.transactionRef,
    };
    if (!macEqual(cardSignature(sk, cardSession, fields, answer), answer.cardSignature)) {
      throw new ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, "card signature does not verify");
    }
    const s = this.state;
    const rest = s.pending.filter((x) => x !== p);
    if (answer.result !== DebitResult.DEBITED) {
      // The card proved, under its key, that it did not debit: cancel.
      await this.save({ ...s, pending: rest, reversed: this.cancelled(p.psamCounter) });
      return { data: VerifyDebitResponse.encode({ verdict: Verdict.DECLINED_BY_CARD, batchNumber: s.batchNumber, recordMac: Buffer.alloc(8) }), sw: SW.OK };
    }
    if (answer.counter !== p.cardCounter + 1 || answer.balance !== p.balanceBefore - p.amount) {
      throw new ApduError(SW.WRONG_DATA, "card's signed state does not follow from the debit");
    }
    const record = {
      psamCounter: p.psamCounter,
      purseId,
      cardCounter: answer.counter,
      amount: p.amount,
      currency: p.currency,
      dateTime: p.dateTime,
      transactionRef: p.transactionRef,
      merchantId: p.merchantId,
      cardSignature: answer.cardSignature,
    };
    const recordMac = batchRecordMac(Buffer.from(s.batchKey, "hex"), fields.psamId, s.batchNumber, record);
    const stored: BatchRecordState = { ...record, purseId: p.purseId, cardSignature: answer.cardSignature.toString("hex"), recordMac: recordMac.toString("hex") };
    await this.save({ ...s, pending: rest, batch: [...s.batch, stored] });
    return { data: VerifyDebitResponse.encode({ verdict: Verdict.RECORDED, batchNumber: s.batchNumber, recordMac }), sw: SW.OK };
  }

  /** REVERSE DEBIT: cancel an open debit the card did not make. A recorded debit cannot be reversed; a repeat is answered alike. */
  private async reverseDebit(c: CommandApdu): Promise<ResponseApdu> {
    const { psamCounter } = decode<{ psamCounter: number }>(ReverseDebitCommand, c.data);
    if (this.state.reversed.includes(psamCounter)) return status(SW.OK);
    if (this.state.batch.some((r) => r.psamCounter === psamCounter)) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, `debit ${psamCounter} is recorded; it cannot be reversed`);
    const p = this.pendingByCounter(psamCounter);
    await this.save({ ...this.state, pending: this.state.pending.filter((x) => x !== p), reversed: this.cancelled(psamCounter) });
    return status(SW.OK);
  }

  private batchTotal(): number {
    return this.state.batch.reduce((t, r) => t + r.amount, 0);
  }

  private readStatus(): ResponseApdu {
    const s = this.state;
    const data = PsamStatusResponse.encode({
      psamId: Buffer.from(s.psamId, "hex"),
      psamCounter: s.counter,
      batchNumber: s.batchNumber,
      batchCount: s.batch.length,
      batchTotal: this.batchTotal(),
      pendingCount: s.pending.length,
      currency: s.currency,
    });
    return { data, sw: SW.OK };
  }

  /** READ PENDING: P1 = index from 0. */
  private readPending(c: CommandApdu): ResponseApdu {
    const p = this.state.pending[c.p1];
    if (!p) return status(SW.RECORD_NOT_FOUND);
    return { data: PendingDebitRecord.encode(p), sw: SW.OK };
  }

  /** READ BATCH RECORD: P1P2 = index from 0. */
  private readBatchRecord(c: CommandApdu): ResponseApdu {
    const r = this.state.batch[(c.p1 << 8) | c.p2];
    if (!r) return status(SW.RECORD_NOT_FOUND);
    const data = BatchRecord.encode({
      ...r,
      purseId: Buffer.from(r.purseId, "hex"),
      cardSignature: Buffer.from(r.cardSignature, "hex"),
      recordMac: Buffer.from(r.recordMac, "hex"),
    });
    return { data, sw: SW.OK };
  }

  /** CLOSE BATCH: MACs the batch's count and total and starts the next batch. */
  private async closeBatch(): Promise<ResponseApdu> {
    const s = this.state;
    const summary = { psamId: Buffer.from(s.psamId, "hex"), batchNumber: s.batchNumber, count: s.batch.length, total: this.batchTotal(), currency: s.currency };
    const mac = batchMac(Buffer.from(s.batchKey, "hex"), summary);
    await this.save({ ...s, batchNumber: s.batchNumber + 1, batch: [] });
    return { data: CloseBatchResponse.encode({ ...summary, batchMac: mac }), sw: SW.OK };
  }
}

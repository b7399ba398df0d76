// The software PSAM: the purchase security application module of docs/apdu.md.
// It holds the issuer's purchase master keys (by version), checks the card,
// signs the DEBIT command, verifies the card's signature and keeps the batch.
// Every answer the payment server acts on (DEBIT command issued, the verdict
// on the card's answer, a reversal) carries its MAC under the PSAM's verdict
// key, so that nobody between the PSAM and the payment server can make one up.
// Its state is a private file made durable before every answer that changes
// it: a JSON snapshot and a log of changes beside it (lib/apdu/state-log.ts),
// one small append per DRAW AMOUNT, VERIFY DEBIT, REVERSE DEBIT, CLOSE BATCH.
// The same PSAM serves authentications when its currency is 999 (its purchase
// keys then being the issuer's authentication master keys) and points when its
// currency is a programme code (the programme's redeem master keys): an
// authentication proven is answered AUTHENTICATED and never enters a batch.

import { ApduError, buildAtr, status, SW, type CommandApdu, type ResponseApdu } from "../../../lib/apdu/apdu.js";
import { SoftwareApplication } from "../../../lib/apdu/software-application.js";
import type { StateLog } from "../../../lib/apdu/state-log.js";
import { macEqual } from "../../../lib/crypto/aes.js";
import { deriveSessionKey, diversifyCardKey } from "../../../lib/crypto/keys.js";
import { AUTHENTICATION_CURRENCY } from "../../../lib/money.js";
import { LayoutError, type Fields, type Layout, type Value } from "../../../lib/protocol/layout.js";
import {
  batchMac,
  batchRecordMac,
  BatchRecord,
  CloseBatchResponse,
  DRAW_P1_RETURN_EXPECTED_SIGNATURE,
  DrawAmountCommand,
  DrawAmountResponse,
  DrawAmountResponseWithSignature,
  issuedMac,
  PendingDebitRecord,
  PSAM_AID,
  PSAM_ATR_HISTORICAL,
  PSAM_CLA,
  PsamIns,
  PsamStatusResponse,
  ReverseDebitCommand,
  ReverseDebitResponse,
  reversalMac,
  Verdict,
  verdictMac,
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
  purchaseCryptogram,
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
  /**
   * The card's session (key version, counter before the debit, challenge hex)
   * and its balance after: what clearing needs to check the card's signature.
   * Absent in records of PSAM files written before records carried them
   * (READ BATCH RECORD gives zeros there; clearing quarantines such a record).
   */
  keyVersion?: number;
  sessionCounter?: number;
  challenge?: string;
  cardCounter: number;
  balanceAfter?: number;
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
  /**
   * The one currency this PSAM accepts, its batches totalled in it: ISO 4217
   * numeric (money), 999 (authentications, which no batch records) or a
   * loyalty programme's code (points).
   */
  currency: number;
  /** Purchase master keys by key version, hex. */
  purchaseKeys: Record<string, string>;
  /** Key for the MACs over batch records and closed batches, hex. */
  batchKey: string;
  /**
   * Key for the MACs over its verdicts (DEBIT command issued, the verdict on
   * the card's answer, a reversal), hex: diversified by the PSAM id from the
   * issuer's verdict master key, which the payment operator's security module
   * holds to check them.
   */
  verdictKey: string;
  /** Most records in the batch before it must be closed; open debits do not count (they have their own limit, MAX_OPEN_DEBITS). */
  batchCapacity: number;
  counter: number;
  batchNumber: number;
  batch: BatchRecordState[];
  pending: PendingDebitState[];
  /** Purse ids (hex) the issuer has blocked. */
  blockedPurses: string[];
  /**
   * How the last debits ended, by PSAM counter, beyond batch closes: a
   * retried VERIFY DEBIT or REVERSE DEBIT whose first answer was lost gets the
   * same answer, never a second record or a second cancellation.
   */
  settled: SettledDebit[];
  /** The last closed batch's summary, readable again (CLOSE BATCH with P1 = 01) until the next close. */
  lastClosed?: { batchNumber: number; count: number; total: number; batchMac: string };
}

export interface SettledDebit {
  psamCounter: number;
  /** "authenticated": an authentication (currency 999) the card proved; no batch record. */
  outcome: "recorded" | "declined" | "reversed" | "authenticated";
  batchNumber: number;
  /** The card's signature (recorded, declined and authenticated debits), hex. */
  cardSignature?: string;
  /** The record MAC (recorded debits), hex. */
  recordMac?: string;
  /**
   * What the verdict MACs bind, for the same answer again: the debit's
   * transaction, amount and currency, and the card's result code (recorded
   * and declined debits). Absent in debits settled before the PSAM gave
   * verdict MACs, which get no MACed answer again.
   */
  transactionRef?: string;
  amount?: number;
  currency?: number;
  cardResult?: number;
}

const SETTLED_KEPT = 1024;

/** The verdict a settled debit is answered with again (a reversed one gets none). */
const SETTLED_VERDICT = { recorded: Verdict.RECORDED, declined: Verdict.DECLINED_BY_CARD, authenticated: Verdict.AUTHENTICATED } as const;

/** Most debits open at once: abandoned ones must not take the batch's room. */
export const MAX_OPEN_DEBITS = 64;

interface Session {
  atr: Buffer;
  card?: InitializeForPurchase;
}

function decode<F extends Fields>(l: Layout<F>, data: Buffer): Value<F> {
  if (data.length !== l.size) throw new ApduError(SW.WRONG_LENGTH, `${l.name} must be ${l.size} bytes`);
  try {
    return l.decode(data);
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
    log: StateLog<PsamFile>,
    private readonly clock: () => Date,
  ) {
    super(path, log);
  }

  static async open(path: string, clock: () => Date = () => new Date()): Promise<SoftwarePsam> {
    const log = await SoftwareApplication.load<PsamFile>(path, "PSAM", (state) => {
      if (!isKeyHex(state.verdictKey)) {
        throw new Error(
          `${path}: PSAM ${state.psamId} holds no verdict key (it was provisioned before PSAM verdicts): ` +
            `with its terminal host stopped, run 'netpurse-issuer add-verdict-key --psam ${path}', or provision a new PSAM`,
        );
      }
    });
    return new SoftwarePsam(path, log, clock);
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
        return c.p1 === 0x01 ? this.lastClosedBatch() : this.closeBatch();
      case PsamIns.READ_KEY_VERSIONS:
        return { data: Buffer.from([...this.keyVersions].sort((a, b) => a - b)), sw: SW.OK };
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

  /**
   * INITIALIZE: the card's response to INITIALIZE FOR PURCHASE; the PSAM
   * checks the card. First what it needs to read the response at all (its
   * format, algorithm and key version), then the card's cryptogram under the
   * card key it derives for that key version and purse id: a response no
   * genuine card made, or one with any field changed, is refused (6982)
   * before anything else is looked at, so a made-up card learns nothing of
   * the PSAM's blocked list, date or currency, and gets no session for
   * DRAW AMOUNT (no counter, no open debit).
   */
  private initialize(c: CommandApdu): ResponseApdu {
    if (!this.session) throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, "no card session: CARD RESET first");
    const card = decode(InitializeForPurchaseResponse, c.data);
    this.session.card = undefined;
    if (card.format !== PURSE_FORMAT) throw new ApduError(SW.WRONG_DATA, "unknown card response format");
    if (card.algorithm !== ALGORITHM_AES128_CMAC) throw new ApduError(SW.FUNCTION_NOT_SUPPORTED, "card algorithm not supported");
    const master = this.purchaseMasterKey(card.keyVersion);
    if (!master) throw new ApduError(SW.REFERENCED_DATA_NOT_FOUND, "key version not held");
    const { cryptogram, ...answer } = card;
    if (!macEqual(purchaseCryptogram(diversifyCardKey(master, card.purseId), answer), cryptogram)) {
      throw new ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, "card cryptogram does not verify: not a genuine card's INITIALIZE FOR PURCHASE response");
    }
    if (card.status !== PurseStatusByte.ACTIVE || this.state.blockedPurses.includes(card.purseId.toString("hex"))) {
      throw new ApduError(SW.CARD_BLOCKED, "card blocked");
    }
    if (isExpired(card.expiry, this.clock())) throw new ApduError(SW.CARD_EXPIRED, "card expired");
    if (card.currency !== this.state.currency) throw new ApduError(SW.CURRENCY_NOT_ACCEPTED, "currency not accepted");
    this.session.card = card;
    return status(SW.OK);
  }

  private get verdictKey(): Buffer {
    return Buffer.from(this.state.verdictKey, "hex");
  }

  /** The issuer's purchase master key of a key version, if this PSAM holds it. */
  private purchaseMasterKey(keyVersion: number): Buffer | undefined {
    const hex = Object.hasOwn(this.state.purchaseKeys, String(keyVersion)) ? this.state.purchaseKeys[String(keyVersion)] : undefined;
    return hex === undefined ? undefined : Buffer.from(hex, "hex");
  }

  private sessionKey(p: { purseId: Buffer; keyVersion: number; cardCounter: number; psamCounter: number; challenge: Buffer }): Buffer {
    const master = this.purchaseMasterKey(p.keyVersion);
    if (!master) throw new ApduError(SW.REFERENCED_DATA_NOT_FOUND, `key version ${p.keyVersion} not held`);
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
    const draw = decode(DrawAmountCommand, c.data);
    // Zero is an authentication's amount, and an authentication's only one.
    const authentication = draw.currency === AUTHENTICATION_CURRENCY;
    if (authentication && draw.amount !== 0) throw new ApduError(SW.AMOUNT_OUT_OF_RANGE, "an authentication (currency 999) draws 0");
    if (!authentication && draw.amount === 0) throw new ApduError(SW.AMOUNT_OUT_OF_RANGE, "amount must be positive");
    if (draw.currency !== card.currency) throw new ApduError(SW.CURRENCY_NOT_ACCEPTED, "amount currency is not the card's");
    if (draw.amount > card.balance) throw new ApduError(SW.INSUFFICIENT_BALANCE, "card balance lower than amount");
    const s = this.state;
    // An authentication takes no room in the batch.
    if (!authentication && s.batch.length >= s.batchCapacity) throw new ApduError(SW.BATCH_FULL, "batch full: close it first");
    if (s.pending.length >= MAX_OPEN_DEBITS) throw new ApduError(SW.TOO_MANY_OPEN_DEBITS, `${MAX_OPEN_DEBITS} debits are open: verify or reverse some first`);
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
    const signature = psamSignature(sk, cardSession, fields);
    const debit = DebitCommand.encode({ ...fields, psamSignature: signature });
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
    const expected =
      c.p1 & DRAW_P1_RETURN_EXPECTED_SIGNATURE
        ? cardSignature(sk, cardSession, fields, { result: DebitResult.DEBITED, counter: card.counter + 1, balance: card.balance - draw.amount })
        : undefined;
    const mac = issuedMac(this.verdictKey, {
      psamId: fields.psamId,
      psamCounter,
      transactionRef: draw.transactionRef,
      amount: draw.amount,
      currency: draw.currency,
      exponent: card.exponent,
      purseId: card.purseId,
      cardCounter: card.counter,
      dateTime,
      psamSignature: signature,
      expectedCardSignature: expected ?? Buffer.alloc(8),
    });
    const data = expected
      ? DrawAmountResponseWithSignature.encode({ debitCommand: debit, expectedCardSignature: expected, issuedMac: mac })
      : DrawAmountResponse.encode({ debitCommand: debit, issuedMac: mac });
    return { data, sw: SW.OK };
  }

  private pendingByCounter(psamCounter: number): PendingDebitState {
    const p = this.state.pending.find((x) => x.psamCounter === psamCounter);
    if (!p) throw new ApduError(SW.REFERENCED_DATA_NOT_FOUND, `no open debit with PSAM counter ${psamCounter}`);
    return p;
  }

  private settle(d: SettledDebit): SettledDebit[] {
    return [...this.state.settled, d].slice(-SETTLED_KEPT);
  }

  /** The debit a settled entry was about, as the verdict MACs bind it. */
  private settledDebit(done: SettledDebit): { transactionRef: string; amount: number; currency: number } {
    const { transactionRef, amount, currency } = done;
    if (transactionRef === undefined || amount === undefined || currency === undefined) {
      throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, `debit ${done.psamCounter} was settled before this PSAM gave verdict MACs`);
    }
    return { transactionRef, amount, currency };
  }

  /** The VERIFY DEBIT answer for a verdict, with its MAC. */
  private verdictAnswer(v: {
    psamCounter: number;
    transactionRef: string;
    amount: number;
    currency: number;
    verdict: number;
    cardResult: number;
    batchNumber: number;
    cardSignature: Buffer;
    recordMac: Buffer;
  }): ResponseApdu {
    const { recordMac, ...bound } = v;
    const mac = verdictMac(this.verdictKey, { psamId: Buffer.from(this.state.psamId, "hex"), ...bound });
    return { data: VerifyDebitResponse.encode({ verdict: v.verdict, batchNumber: v.batchNumber, recordMac, verdictMac: mac }), sw: SW.OK };
  }

  /** A retried VERIFY DEBIT: the same answer as the first time, if the card's answer is the same. */
  private verifyAgain(done: SettledDebit, answer: { cardSignature: Buffer }): ResponseApdu {
    if (done.outcome === "reversed") throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, `debit ${done.psamCounter} was reversed`);
    if (!macEqual(Buffer.from(done.cardSignature ?? "", "hex"), answer.cardSignature)) {
      throw new ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, `debit ${done.psamCounter} was settled with another card signature`);
    }
    const debit = this.settledDebit(done);
    if (done.cardResult === undefined)
      throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, `debit ${done.psamCounter} was settled before this PSAM gave verdict MACs`);
    return this.verdictAnswer({
      psamCounter: done.psamCounter,
      ...debit,
      verdict: SETTLED_VERDICT[done.outcome],
      cardResult: done.cardResult,
      batchNumber: done.batchNumber,
      cardSignature: answer.cardSignature,
      recordMac: Buffer.from(done.recordMac ?? "0000000000000000", "hex"),
    });
  }

  /**
   * VERIFY DEBIT: the card's answer. A debit the card proves goes into the
   * batch, whatever the client claimed its balance was: the card's signature
   * is the proof. A signed refusal cancels the debit.
   */
  private async verifyDebit(c: CommandApdu): Promise<ResponseApdu> {
    const v = decode(VerifyDebitCommand, c.data);
    const answer = decode(DebitResponse, v.debitResponse);
    const done = this.state.settled.find((x) => x.psamCounter === v.psamCounter);
    if (done) return this.verifyAgain(done, answer);
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
    const signature = answer.cardSignature.toString("hex");
    const debit = { transactionRef: p.transactionRef, amount: p.amount, currency: p.currency };
    const verdict = { psamCounter: p.psamCounter, ...debit, cardResult: answer.result, batchNumber: s.batchNumber, cardSignature: answer.cardSignature };
    if (answer.result !== DebitResult.DEBITED) {
      await this.save({
        ...s,
        pending: rest,
        settled: this.settle({
          psamCounter: p.psamCounter,
          outcome: "declined",
          batchNumber: s.batchNumber,
          cardSignature: signature,
          ...debit,
          cardResult: answer.result,
        }),
      });
      return this.verdictAnswer({ ...verdict, verdict: Verdict.DECLINED_BY_CARD, recordMac: Buffer.alloc(8) });
    }
    if (p.currency === AUTHENTICATION_CURRENCY) {
      // The card proved it is present and moved no value: nothing to record, nothing to clear.
      const settled = this.settle({
        psamCounter: p.psamCounter,
        outcome: "authenticated",
        batchNumber: s.batchNumber,
        cardSignature: signature,
        ...debit,
        cardResult: answer.result,
      });
      await this.save({ ...s, pending: rest, settled });
      return this.verdictAnswer({ ...verdict, verdict: Verdict.AUTHENTICATED, recordMac: Buffer.alloc(8) });
    }
    const record = {
      psamCounter: p.psamCounter,
      purseId,
      keyVersion: p.keyVersion,
      sessionCounter: p.cardCounter,
      challenge: cardSession.challenge,
      cardCounter: answer.counter,
      balanceAfter: answer.balance,
      amount: p.amount,
      currency: p.currency,
      dateTime: p.dateTime,
      transactionRef: p.transactionRef,
      merchantId: p.merchantId,
      cardSignature: answer.cardSignature,
    };
    const recordMac = batchRecordMac(Buffer.from(s.batchKey, "hex"), fields.psamId, s.batchNumber, record);
    const stored: BatchRecordState = { ...record, purseId: p.purseId, challenge: p.challenge, cardSignature: signature, recordMac: recordMac.toString("hex") };
    const settled = this.settle({
      psamCounter: p.psamCounter,
      outcome: "recorded",
      batchNumber: s.batchNumber,
      cardSignature: signature,
      recordMac: stored.recordMac,
      ...debit,
      cardResult: answer.result,
    });
    await this.save({ ...s, pending: rest, batch: [...s.batch, stored], settled });
    return this.verdictAnswer({ ...verdict, verdict: Verdict.RECORDED, recordMac });
  }

  /** The REVERSE DEBIT answer: the MAC saying this debit is cancelled. */
  private reversalAnswer(psamCounter: number, debit: { transactionRef: string; amount: number; currency: number }): ResponseApdu {
    const mac = reversalMac(this.verdictKey, { psamId: Buffer.from(this.state.psamId, "hex"), psamCounter, ...debit });
    return { data: ReverseDebitResponse.encode({ reversalMac: mac }), sw: SW.OK };
  }

  /**
   * REVERSE DEBIT: cancel an open debit the card did not make. A recorded
   * debit cannot be reversed; a repeat, or a debit the card declined, is
   * answered alike: it is cancelled.
   */
  private async reverseDebit(c: CommandApdu): Promise<ResponseApdu> {
    const { psamCounter } = decode(ReverseDebitCommand, c.data);
    const done = this.state.settled.find((x) => x.psamCounter === psamCounter);
    if (done?.outcome === "recorded" || done?.outcome === "authenticated") {
      throw new ApduError(SW.CONDITIONS_NOT_SATISFIED, `debit ${psamCounter} is ${done.outcome}; it cannot be reversed`);
    }
    if (done) return this.reversalAnswer(psamCounter, this.settledDebit(done));
    const p = this.pendingByCounter(psamCounter);
    const debit = { transactionRef: p.transactionRef, amount: p.amount, currency: p.currency };
    const settled = this.settle({ psamCounter, outcome: "reversed", batchNumber: this.state.batchNumber, ...debit });
    await this.save({ ...this.state, pending: this.state.pending.filter((x) => x !== p), settled });
    return this.reversalAnswer(psamCounter, debit);
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
    // A record of a PSAM file from before batch records carried the card's session reads with zeros there: clearing quarantines it.
    const data = BatchRecord.encode({
      ...r,
      keyVersion: r.keyVersion ?? 0,
      sessionCounter: r.sessionCounter ?? 0,
      challenge: Buffer.from(r.challenge ?? "0000000000000000", "hex"),
      balanceAfter: r.balanceAfter ?? 0,
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
    const lastClosed = { batchNumber: summary.batchNumber, count: summary.count, total: summary.total, batchMac: mac.toString("hex") };
    await this.save({ ...s, batchNumber: s.batchNumber + 1, batch: [], lastClosed });
    return { data: CloseBatchResponse.encode({ ...summary, batchMac: mac }), sw: SW.OK };
  }

  /** CLOSE BATCH with P1 = 01: the last closed batch's summary again (its answer may have been lost). */
  private lastClosedBatch(): ResponseApdu {
    const s = this.state;
    if (!s.lastClosed) throw new ApduError(SW.REFERENCED_DATA_NOT_FOUND, "no batch closed yet");
    const { batchMac: mac, ...rest } = s.lastClosed;
    return {
      data: CloseBatchResponse.encode({ psamId: Buffer.from(s.psamId, "hex"), currency: s.currency, ...rest, batchMac: Buffer.from(mac, "hex") }),
      sw: SW.OK,
    };
  }
}

const isKeyHex = (k: unknown): k is string => typeof k === "string" && /^[0-9a-f]{32}$/.test(k);

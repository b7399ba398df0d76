// The payment server's RPC handlers (payment module 228): it opens the
// sealed draw request, has a PSAM in the pool sign the DEBIT command (and, in
// the modes of FIG. 6-8, predict the card's signature), rules on the card's
// answer or takes the card's proof after the fact, and confirms the purchase
// to the merchant with a debit result M only the merchant can read. Every
// step is in the database before the server answers; every RPC is
// idempotent by transaction id; the steps of one transaction run one at a
// time under its lock, which replicas sharing one PostgreSQL database share
// (lib/store/locks.ts): any replica can take any step of any purchase.

import { createHash } from "node:crypto";
import { Status, type CallContext } from "nice-grpc";
import { confirmationModeToJSON, ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import {
  CardAnswer,
  DrawRequest,
  type CompletePurchaseRequest,
  type CompletePurchaseResponse,
  type PaymentServiceImplementation,
  type ProcessDrawRequestRequest,
  type ProcessDrawRequestResponse,
  type ReportCardSignatureRequest,
  type ReportCardSignatureResponse,
} from "../../gen/netpurse/payment/v1/payment.js";
import { SW } from "../../lib/apdu/apdu.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { freshBytes } from "../../lib/crypto/random.js";
import { invalidField, NetpurseError, notFound } from "../../lib/grpc/errors.js";
import { callDeadline } from "../../lib/grpc/server.js";
import { requireMerchantId, requireTransactionId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { formatMoney } from "../../lib/money.js";
import { KeyedMutex } from "../../lib/mutex.js";
import type { TransactionLocks } from "../../lib/store/locks.js";
import { open } from "../../lib/protocol/encryption-layer.js";
import { DebitResponse, LogRecord } from "../../lib/protocol/purse.js";
import type { DebitCommands } from "./debit-command.js";
import { editDrawRequest, type EditedDrawRequest } from "./draw-request.js";
import type { Merchant, MerchantRegistry } from "./merchants.js";
import { MIN_JOB_MS } from "./psam-work.js";
import type { Recovery } from "./recovery.js";
import { errorOf, sealBroken } from "./refusals.js";
import type { Ruling } from "./ruling.js";
import {
  answerColumns,
  type CardAnswer as RecordedAnswer,
  type NewPurchase,
  type PaidPurchase,
  type PaymentStore,
  type Purchase,
  type SignedPurchase,
  type Step,
} from "./store.js";
import { decodeSealed, encodeSealed, grantExpired, keysFor, requireGrantedTerms, ungrantedRefusal, type TransactionKeys } from "./transaction-keys.js";
import { debitCommandResponse, purchaseView, results, stateEnum } from "./views.js";

/** At most this many card log records travel with a draw request. */
const MAX_CARD_LOG = 8;

/** Time kept back from the caller's deadline, so that our answer reaches it before the caller gives up. */
const DEADLINE_MARGIN_MS = 100;

/** Longest wait, for a draw request at its purse's bound, for the card's log it brought to settle purchases. */
const CARD_LOG_WAIT_MS = 2_000;

/**
 * How long after its deadline a draw request's place under its purse's
 * bound still counts: its handler is done by then (a PSAM job never outlasts
 * the deadline by more than a commit), and a replica that died holding one
 * keeps the purse's place that long at most.
 */
const DRAW_PLACE_SLACK_MS = 30_000;

/** Waits for `p`, or `ms` at most. */
async function within(p: Promise<void>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([p, new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
  clearTimeout(timer);
}

const sha256 = (...parts: Uint8Array[]) => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest("hex");
};

const isPaid = (p: Purchase): p is PaidPurchase => p.state === "PROVEN" || p.state === "COMPLETED";

export class PaymentServer {
  constructor(
    private readonly o: {
      store: PaymentStore;
      merchants: MerchantRegistry;
      debitCommands: DebitCommands;
      ruling: Ruling;
      recovery: Recovery;
      locks: TransactionLocks;
      log: Logger;
      /** Longest wait for a free PSAM when the caller set no deadline. */
      maxPsamWaitMs: number;
      /**
       * Most purchases of one purse whose DEBIT command was issued and whose
       * card answer is not recorded yet; beyond it a new draw request of that
       * purse is refused before any PSAM is asked.
       */
      maxUnansweredPerPurse: number;
    },
  ) {}

  /**
   * The per-purse check and its reservation run one at a time per purse in
   * this process (across replicas, the database's serializable transaction
   * keeps them apart), so that its own draw requests do not make each other retry.
   */
  private readonly purseLocks = new KeyedMutex();

  readonly service: PaymentServiceImplementation = {
    processDrawRequest: (req, ctx) => this.processDrawRequest(req, ctx),
    completePurchase: (req, ctx) => this.completePurchase(req, ctx),
    reportCardSignature: (req, ctx) => this.reportCardSignature(req, ctx),
    getPurchase: async (req) => {
      const id = requireTransactionId(req.transactionId);
      const p = await this.o.store.get(id);
      if (!p) throw notFound(`transaction ${id} is unknown to this payment server`);
      return { purchase: purchaseView(p, await this.o.store.events(id)) };
    },
  };

  /** When to give up waiting: a little before the caller's deadline, or our own limit. */
  private deadline(ctx: CallContext): number {
    return Math.min(Date.now() + this.o.maxPsamWaitMs, (callDeadline(ctx) ?? Infinity) - DEADLINE_MARGIN_MS);
  }

  private async merchant(id: string): Promise<Merchant> {
    const m = await this.o.merchants.get(id);
    if (!m)
      throw new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_UNKNOWN_MERCHANT, `merchant "${id}" is not registered at this payment server`);
    return m;
  }

  /** The keys of a recorded transaction, derived again from the merchant's key and the offer's nonce and ETSK. */
  private async keysOf(p: Purchase): Promise<TransactionKeys> {
    return keysFor(await this.merchant(p.merchant_id), p.transaction_id, p.key_nonce, decodeSealed(p.encrypted_session_key));
  }

  // ---- steps 680-694: draw request -> DEBIT command ------------------------

  private async processDrawRequest(req: ProcessDrawRequestRequest, ctx: CallContext): Promise<ProcessDrawRequestResponse> {
    const id = requireTransactionId(req.transactionId);
    const mid = requireMerchantId(req.merchantId);
    if (req.keyNonce.length !== 16) throw invalidField("key_nonce", `must be 16 bytes, got ${req.keyNonce.length}`);
    if (!req.encryptedSessionKey) throw invalidField("encrypted_session_key", "missing");
    if (!req.drawRequest) throw invalidField("draw_request", "missing");
    const merchant = await this.merchant(mid);
    const keys = keysFor(merchant, id, req.keyNonce, req.encryptedSessionKey);
    const dr = this.openDrawRequest(keys, id, req);
    const v = editDrawRequest(dr);
    if (v.transactionId !== id) throw invalidField("draw_request.transaction_id", "is not the request's transaction_id");
    // The offer binds the amount and the merchant: a draw request of other terms than the ones the merchant's
    // validation service sealed with the TSK is refused here, before anything is recorded or any PSAM is asked.
    // (A recorded draw request passed this check when it came, so its retry passes it again.)
    if (keys.grant) {
      try {
        requireGrantedTerms(keys.grant, v);
      } catch (e) {
        this.o.log.warn("draw request does not match the offer", { transaction: id, merchant: mid });
        throw e;
      }
    }
    if (v.merchantId !== mid) throw invalidField("draw_request.merchant_id", "is not the request's merchant_id");
    const log = this.cardLog(dr);
    // The content decides idempotency, not its sealing (a re-sealed retry has a new nonce).
    const hash = sha256(Buffer.from(DrawRequest.encode({ ...dr, cardLog: [] }).finish()), req.keyNonce);
    const deadline = this.deadline(ctx);
    return this.o.locks.run(id, { deadline }, async (held) => {
      if (merchant.mode !== v.mode) {
        throw invalidField("draw_request.confirmation_mode", `merchant "${mid}" confirms with ${confirmationModeToJSON(merchant.mode)}`);
      }
      let p = await this.o.store.get(id);
      if (p) {
        if (p.request_hash !== hash) {
          throw new NetpurseError(
            Status.ALREADY_EXISTS,
            ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
            `transaction ${id} was already used with another draw request`,
          );
        }
        // A recorded draw request gets its recorded answer, after the offer's expiry too.
        if (p.state === "REFUSED") throw errorOf(p.failure);
        if (p.state !== "RECEIVED") return debitCommandResponse(p, keys);
        // No DEBIT command left this server yet: asking a PSAM now would sign one after the offer expired.
        const expired = keys.grant && grantExpired(keys.grant, new Date());
        if (expired) return this.o.debitCommands.refuse(p, expired);
        await this.o.store.log(id, { step: "draw_request_retried", detail: "no debit command had been issued; trying again" });
      } else {
        if (!keys.grant) throw ungrantedRefusal();
        const expired = grantExpired(keys.grant, new Date());
        if (expired) throw expired; // not recorded: nothing was asked of a PSAM
      }
      const purse = v.card.purseId.toString("hex");
      const settling = this.o.recovery.settleFromCardLog(
        purse,
        log.filter((r) => r.transactionRef !== id),
      );
      // Before anything is recorded or any PSAM asked: a purse with too many DEBIT commands awaiting its answer gets no other.
      // (A draw request already answered with a DEBIT command got its recorded answer above: a retry is not counted twice.)
      // A new purchase is recorded in the same commit as its place under the bound.
      p = await this.reserveDraw(purse, p ? { retry: p } : { insert: this.newPurchase(id, hash, v, req) }, log.length > 0 ? settling : undefined, deadline);
      try {
        if (p.state !== "RECEIVED") throw new Error(`transaction ${id} left RECEIVED under its lock`);
        if (v.card.currency !== v.currency) {
          return await this.o.debitCommands.refuse(
            p,
            new NetpurseError(
              Status.FAILED_PRECONDITION,
              ErrorReason.ERROR_REASON_CURRENCY_MISMATCH,
              `the card holds currency ${v.card.currency}, the offer is in ${v.currency}; nothing was debited`,
            ),
          );
        }
        const signed = await this.o.debitCommands.issue(p, { atr: v.cardAtr, initializeResponse: v.initializeResponse }, deadline, held);
        return debitCommandResponse(signed, keys);
      } catch (e) {
        // Ended without its DEBIT command (a move out of RECEIVED gave its place back already): the place is given back now.
        await this.o.store.releaseDraw(id).catch((err: unknown) =>
          this.o.log.warn("a draw request's place under its purse's bound was not given back; it expires", {
            transaction: id,
            error: (err as Error).message,
          }),
        );
        throw e;
      }
    });
  }

  /**
   * The per-purse bound: counts, in the database (so that it holds across
   * replicas), the purse's purchases whose DEBIT command is issued and whose
   * card answer is not recorded, with the purse's draw requests being worked
   * on now, and refuses one more beyond the bound (FAILED_PRECONDITION,
   * WRONG_STATE; a new purchase is not recorded, so the same draw request
   * may go through once the card has answered). At the bound, a draw request
   * that brought the card's log first waits a little for that log to settle
   * what it proves (`settling`), and counts again. Otherwise it takes a place
   * until the draw request has its outcome (the purchase leaving RECEIVED
   * gives it back, or releaseDraw), and records a new purchase in the same
   * commit: the purchase, RECEIVED. A made-up card cannot pass the PSAM at
   * all; this bounds what one genuine card's INITIALIZE response, replayed,
   * can hold open in the PSAMs.
   */
  private async reserveDraw(
    purse: string,
    draw: { insert: { row: NewPurchase; event: Step } } | { retry: Purchase },
    settling: Promise<void> | undefined,
    deadline: number,
  ): Promise<Purchase> {
    const until = new Date(deadline + DRAW_PLACE_SLACK_MS).toISOString();
    const tryReserve = () =>
      this.purseLocks.run(purse, () =>
        this.o.store.reserveDraw(
          purse,
          "insert" in draw ? { insert: draw.insert.row, event: draw.insert.event } : { retry: draw.retry.transaction_id },
          this.o.maxUnansweredPerPurse,
          until,
        ),
      );
    let r = await tryReserve();
    const wait = Math.min(CARD_LOG_WAIT_MS, deadline - Date.now() - MIN_JOB_MS);
    if (typeof r === "number" && settling && wait > 0) {
      await within(settling, wait);
      r = await tryReserve();
    }
    if (r === undefined)
      throw new NetpurseError(Status.ABORTED, ErrorReason.ERROR_REASON_UNSPECIFIED, "concurrent draw request for the same transaction; retry");
    if (typeof r !== "number") return r;
    const why = `the card has ${r} purchase${r === 1 ? "" : "s"} waiting for its answer: finish them (the client daemon does, from the card's log) or wait for them to be settled; nothing was debited`;
    this.o.log.warn("draw request refused: too many DEBIT commands await the card's answer", { purse, waiting: r });
    if ("retry" in draw) await this.o.store.log(draw.retry.transaction_id, { step: "purse_bound_reached", detail: why });
    throw new NetpurseError(Status.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_WRONG_STATE, why);
  }

  private openDrawRequest(keys: TransactionKeys, id: string, req: ProcessDrawRequestRequest): DrawRequest {
    const plain = open(keys.tsk, "DRAW_REQUEST", id, req.drawRequest);
    if (!plain) throw sealBroken("the draw request");
    try {
      return DrawRequest.decode(plain);
    } catch {
      throw invalidField("draw_request", "is not a DrawRequest");
    }
  }

  /** The card's log records that came with the draw request, checked. */
  private cardLog(dr: DrawRequest) {
    if (dr.cardLog.length > MAX_CARD_LOG) throw invalidField("draw_request.card_log", `at most ${MAX_CARD_LOG} records`);
    return dr.cardLog.map((r, i) => {
      if (r.length !== LogRecord.size) throw invalidField(`draw_request.card_log[${i}]`, `must be ${LogRecord.size} bytes`);
      try {
        return LogRecord.decode(r);
      } catch {
        throw invalidField(`draw_request.card_log[${i}]`, "is not a card log record");
      }
    });
  }

  /** The purchase a new draw request records, with its first event. */
  private newPurchase(id: string, hash: string, v: EditedDrawRequest, req: ProcessDrawRequestRequest): { row: NewPurchase; event: Step } {
    if (!req.encryptedSessionKey) throw invalidField("encrypted_session_key", "missing");
    const mode = confirmationModeToJSON(v.mode).replace("CONFIRMATION_MODE_", "");
    return {
      row: {
        transaction_id: id,
        request_hash: hash,
        merchant_id: v.merchantId,
        amount_minor: v.amount,
        currency: v.currency,
        exponent: v.exponent,
        purse_id: v.card.purseId.toString("hex"),
        card_counter: v.card.counter,
        card_balance: v.card.balance,
        key_version: v.card.keyVersion,
        confirmation_mode: v.mode,
        completion_token: freshBytes(16),
        key_nonce: Buffer.from(req.keyNonce),
        encrypted_session_key: encodeSealed(req.encryptedSessionKey),
      },
      event: {
        step: "draw_request_received",
        detail: `${mode}: purse ${v.card.purseId.toString("hex")} counter ${v.card.counter} pays ${formatMoney({ amountMinor: v.amount, currency: v.currency, exponent: v.exponent })} to ${v.merchantId}`,
      },
    };
  }

  // ---- steps 622-634: the card's answer -> debit results C and M ----------------

  private async completePurchase(req: CompletePurchaseRequest, ctx: CallContext): Promise<CompletePurchaseResponse> {
    const id = requireTransactionId(req.transactionId);
    if (!req.cardAnswer) throw invalidField("card_answer", "missing");
    const deadline = this.deadline(ctx);
    await this.known(id);
    return this.o.locks.run(id, { deadline }, async () => {
      let p = await this.o.store.get(id);
      if (!p) throw notFound(`transaction ${id} is unknown to this payment server`);
      const keys = await this.keysOf(p);
      const plain = open(keys.tsk, "CARD_ANSWER", id, req.cardAnswer);
      if (!plain) throw sealBroken("the card answer");
      let a: CardAnswer;
      try {
        a = CardAnswer.decode(plain);
      } catch {
        throw invalidField("card_answer", "is not a CardAnswer");
      }
      if (!macEqual(p.completion_token, a.completionToken)) {
        throw new NetpurseError(
          Status.PERMISSION_DENIED,
          ErrorReason.ERROR_REASON_WRONG_COMPLETION_TOKEN,
          `completion_token is not transaction ${id}'s: only the client that sent the draw request may complete it`,
        );
      }
      const answer = checkedAnswer(a);
      if ("answer" in p && p.answer) {
        if (!sameAnswer(p.answer, answer)) {
          throw new NetpurseError(
            Status.ALREADY_EXISTS,
            ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
            `a different card answer was already recorded for transaction ${id}`,
          );
        }
      } else {
        // A refused draw request (the PSAM's refusal, or ended without its DEBIT command) gets its recorded answer.
        if (p.state === "REVERSED" || p.state === "REFUSED") throw errorOf(p.failure);
        if (p.state !== "DEBIT_COMMAND_ISSUED" && p.state !== "IN_DOUBT") {
          throw new NetpurseError(
            Status.FAILED_PRECONDITION,
            ErrorReason.ERROR_REASON_WRONG_STATE,
            `no DEBIT command is awaiting the card's answer for transaction ${id} (state ${p.state})`,
          );
        }
        // FIG. 6-8: the debit the PSAM predicted is recorded and proven in one commit; any other answer is recorded first.
        p = (await this.o.ruling.proveOnArrival(p, answer, answerStep(answer))) ?? (await this.record(p, answer));
      }
      if (p.state === "REVERSED") throw errorOf(p.failure);
      if (!isPaid(p)) {
        if ((p.state !== "DEBIT_RESPONSE_RECEIVED" && p.state !== "IN_DOUBT") || !p.answer) {
          throw new NetpurseError(Status.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_WRONG_STATE, `transaction ${id} is ${p.state}`);
        }
        p = await this.o.ruling.ruleStored({ ...p, answer: p.answer }, deadline);
      }
      if (!isPaid(p)) throw new Error(`transaction ${id} was ruled on without being paid or refused`);
      return results(p, keys);
    });
  }

  /** Records the card's answer before anything is done with it (from the state read: another holder's write makes this one change nothing). */
  private async record(p: SignedPurchase, a: RecordedAnswer): Promise<Purchase> {
    const moved = await this.o.store.transition(p.transaction_id, [p.state], { state: "DEBIT_RESPONSE_RECEIVED", ...answerColumns(a) }, answerStep(a));
    return moved ?? this.o.store.require(p.transaction_id);
  }

  // ---- the card's proof after the fact --------------------------------------------

  private async reportCardSignature(req: ReportCardSignatureRequest, ctx: CallContext): Promise<ReportCardSignatureResponse> {
    const id = requireTransactionId(req.transactionId);
    if (req.debitResponse.length !== DebitResponse.size) {
      throw invalidField("debit_response", `must be the card's ${DebitResponse.size}-byte answer, got ${req.debitResponse.length} bytes`);
    }
    const raw = Buffer.from(req.debitResponse);
    const deadline = this.deadline(ctx);
    await this.known(id);
    return this.o.locks.run(id, { deadline }, async () => {
      const p = await this.o.store.get(id);
      if (!p) throw notFound(`transaction ${id} is unknown to this payment server`);
      const after = await this.o.ruling.ruleReported(p, DebitResponse.decode(raw), raw, "reported", deadline);
      return { transactionId: txnId(id), state: stateEnum[after.state] };
    });
  }

  /** NOT_FOUND for a transaction with no record, before its lock is asked for: made-up ids take no lock connection. */
  private async known(id: string): Promise<void> {
    if (!(await this.o.store.get(id))) throw notFound(`transaction ${id} is unknown to this payment server`);
  }
}

/** The event that records a card's answer. */
function answerStep(a: RecordedAnswer): Step {
  const detail =
    a.kind === "not_debited"
      ? `the client reports that the card's log proves it never made this debit`
      : a.statusWord === SW.OK
        ? `card answered 9000, result ${a.debitResponse[0]}`
        : `card refused DEBIT with SW ${a.statusWord.toString(16).toUpperCase()}`;
  return { step: "debit_response_received", detail };
}

/** The card's answer as CompletePurchase carries it, each form checked. */
function checkedAnswer(a: CardAnswer): RecordedAnswer {
  if (a.cardLogProvesNoDebit) {
    if (a.cardStatusWord !== 0 || a.debitResponse.length !== 0) {
      throw invalidField("card_answer.card_log_proves_no_debit", "card_status_word and debit_response must be empty with it");
    }
    return { kind: "not_debited", proof: "the card's log, read by the cardholder's client after the card's answer was lost, shows no such debit" };
  }
  const sw = a.cardStatusWord;
  if (sw < 0x6000 || sw > 0xffff) throw invalidField("card_answer.card_status_word", `0x${sw.toString(16)} is not an ISO 7816 status word`);
  if (sw === SW.OK && a.debitResponse.length !== DebitResponse.size) {
    throw invalidField(
      "card_answer.debit_response",
      `must be the card's ${DebitResponse.size}-byte answer when card_status_word is 9000, got ${a.debitResponse.length} bytes`,
    );
  }
  if (sw !== SW.OK && a.debitResponse.length !== 0)
    throw invalidField("card_answer.debit_response", "must be empty when the card answered with an error status word");
  return { kind: "card", statusWord: sw, debitResponse: Buffer.from(a.debitResponse) };
}

function sameAnswer(x: RecordedAnswer, y: RecordedAnswer): boolean {
  if (x.kind === "not_debited" || y.kind === "not_debited") return x.kind === y.kind;
  return x.statusWord === y.statusWord && x.debitResponse.equals(y.debitResponse);
}

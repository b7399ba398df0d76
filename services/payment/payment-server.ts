// The payment server (payment module 228): it takes the draw request, has a
// PSAM in the pool sign the DEBIT command, takes the card's answer, has the
// same PSAM verify the card's signature, and confirms the purchase to the
// merchant. Every step is in the database before the server answers; every
// RPC is idempotent by transaction id; a restart resumes from the log.

import { createHash, randomBytes } from "node:crypto";
import { Status, type CallContext } from "nice-grpc";
import { ConfirmationMode, confirmationModeToJSON, ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import {
  CompletePurchaseRequest,
  DrawRequest,
  PurchaseConfirmation,
  PurchaseState,
  type CompletePurchaseResponse,
  type GetPurchaseResponse,
  type PaymentServiceImplementation,
  type ProcessDrawRequestResponse,
} from "../../gen/netpurse/payment/v1/payment.js";
import { DebitVerdict, PsamJobStatus, type PsamJob, type PsamJobResult, type PsamSlot, type TerminalInfo } from "../../gen/netpurse/terminal/v1/terminal.js";
import { swHex, SW } from "../../lib/apdu/apdu.js";
import { invalidField, NetpurseError, notFound } from "../../lib/grpc/errors.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { callDeadline } from "../../lib/grpc/server.js";
import { hexOf, merchantId, psamId, purseId, requireTransactionId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { formatMoney, money } from "../../lib/money.js";
import { confirmationMac } from "../../lib/protocol/confirmation.js";
import { DebitResponse, DebitResult } from "../../lib/protocol/purse.js";
import { editDrawRequest } from "./draw-request.js";
import type { MerchantRegistry } from "./merchants.js";
import type { PaymentStore, PurchaseRow, State } from "./store.js";
import { NoPsamFits, NoPsamFree, type ConcentratorLink, type Lease, type PsamPool } from "./terminal-pool.js";

export interface PaymentServerOptions {
  store: PaymentStore;
  merchants: MerchantRegistry;
  pool: PsamPool;
  link: ConcentratorLink;
  log: Logger;
  /** How long a PSAM stays held for the cardholder's answer in PSAM_VERIFIES mode. */
  holdTimeoutMs?: number;
  /** Longest wait for a free PSAM when the caller set no deadline. */
  maxPsamWaitMs?: number;
  /** Longest wait for a terminal's answer to one job. */
  jobTimeoutMs?: number;
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

/** The least time worth giving a terminal for one job; with less left, no job is sent. */
const MIN_JOB_MS = 1_000;

/** The gRPC error a PSAM's refusal of the card becomes. */
function psamRefusal(sw: number): NetpurseError {
  const fp = (reason: ErrorReason, what: string) => new NetpurseError(Status.FAILED_PRECONDITION, reason, `${what} (PSAM SW ${swHex(sw)}); nothing was debited`);
  switch (sw) {
    case SW.CARD_EXPIRED:
      return fp(ErrorReason.ERROR_REASON_CARD_EXPIRED, "the card has expired");
    case SW.CURRENCY_NOT_ACCEPTED:
      return fp(ErrorReason.ERROR_REASON_CURRENCY_MISMATCH, "the card's currency is not the amount's, or the PSAM does not accept it");
    case SW.CARD_BLOCKED:
      return fp(ErrorReason.ERROR_REASON_CARD_BLOCKED, "the card is blocked");
    case SW.INSUFFICIENT_BALANCE:
      return fp(ErrorReason.ERROR_REASON_INSUFFICIENT_BALANCE, "the card's balance is lower than the amount");
    case SW.REFERENCED_DATA_NOT_FOUND:
      return fp(ErrorReason.ERROR_REASON_KEY_VERSION_UNKNOWN, "no PSAM holds the card's key version");
    case SW.AMOUNT_OUT_OF_RANGE:
      return invalidField("draw_request.amount.amount_minor", `the PSAM refused the amount (SW ${swHex(sw)})`);
    case SW.WRONG_LENGTH:
    case SW.WRONG_DATA:
    case SW.FUNCTION_NOT_SUPPORTED:
      return invalidField("draw_request.initialize_response", `the PSAM refused the card's response as malformed (SW ${swHex(sw)})`);
    default:
      return fp(ErrorReason.ERROR_REASON_UNSPECIFIED, "the PSAM refused the card");
  }
}

/** The card's signed refusal of a debit, as the error the client gets. */
function cardDeclined(result: number): NetpurseError {
  const why: Record<number, [ErrorReason, string]> = {
    [DebitResult.INSUFFICIENT_BALANCE]: [ErrorReason.ERROR_REASON_INSUFFICIENT_BALANCE, "the card's balance is lower than the amount"],
    [DebitResult.CURRENCY_MISMATCH]: [ErrorReason.ERROR_REASON_CURRENCY_MISMATCH, "the card's currency is not the amount's"],
    [DebitResult.EXPIRED]: [ErrorReason.ERROR_REASON_CARD_EXPIRED, "the card has expired"],
    [DebitResult.BLOCKED]: [ErrorReason.ERROR_REASON_CARD_BLOCKED, "the card is blocked"],
  };
  const [reason, text] = why[result] ?? [ErrorReason.ERROR_REASON_CARD_REFUSED, `the card declined the debit (result ${result})`];
  return new NetpurseError(Status.FAILED_PRECONDITION, reason, `${text}; the card proved it did not debit and the transaction was reversed in the PSAM`);
}

const stateEnum: Record<State, PurchaseState> = {
  RECEIVED: PurchaseState.PURCHASE_STATE_RECEIVED,
  DEBIT_COMMAND_ISSUED: PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED,
  DEBIT_RESPONSE_RECEIVED: PurchaseState.PURCHASE_STATE_DEBIT_RESPONSE_RECEIVED,
  COMPLETED: PurchaseState.PURCHASE_STATE_COMPLETED,
  REVERSED: PurchaseState.PURCHASE_STATE_REVERSED,
  REFUSED: PurchaseState.PURCHASE_STATE_REFUSED,
  IN_DOUBT: PurchaseState.PURCHASE_STATE_IN_DOUBT,
};

const keyOf = (row: PurchaseRow) => `${row.terminal_id}/${row.psam_id}`;

export class PaymentServer {
  private readonly serials = new Map<string, Promise<unknown>>();
  /** PSAMs held across the cardholder's round trip (PSAM_VERIFIES). */
  private readonly holds = new Map<string, { lease: Lease; timer: NodeJS.Timeout }>();
  private readonly holdTimeoutMs: number;
  private readonly maxPsamWaitMs: number;
  private readonly jobTimeoutMs: number;

  constructor(private readonly o: PaymentServerOptions) {
    this.holdTimeoutMs = o.holdTimeoutMs ?? 60_000;
    this.maxPsamWaitMs = o.maxPsamWaitMs ?? 10_000;
    this.jobTimeoutMs = o.jobTimeoutMs ?? 10_000;
  }

  readonly service: PaymentServiceImplementation = {
    processDrawRequest: (req, ctx) => this.processDrawRequest(req.drawRequest, ctx),
    completePurchase: (req, ctx) => this.completePurchase(CompletePurchaseRequest.fromPartial(req), ctx),
    getPurchase: async (req) => this.getPurchase(requireTransactionId(req.transactionId)),
  };

  /** Runs the steps of one transaction one at a time, whoever asks. */
  private serial<T>(transactionId: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.serials.get(transactionId) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const tail = next.catch(() => undefined);
    this.serials.set(transactionId, tail);
    void tail.then(() => {
      if (this.serials.get(transactionId) === tail) this.serials.delete(transactionId);
    });
    return next;
  }

  /** When to give up waiting: a little before the caller's deadline, or our own limit. */
  private deadline(ctx: CallContext | undefined, cap: number): number {
    const d = ctx ? callDeadline(ctx) : undefined;
    return Math.min(Date.now() + cap, (d ?? Infinity) - 100);
  }

  // ---- step 680-694: draw request -> DEBIT command ------------------------

  private async processDrawRequest(dr: DrawRequest | undefined, ctx: CallContext): Promise<ProcessDrawRequestResponse> {
    const v = editDrawRequest(dr);
    const hash = sha256(DrawRequest.encode(dr!).finish());
    const deadline = this.deadline(ctx, this.maxPsamWaitMs);
    return this.serial(v.transactionId, async () => {
      const merchant = await this.o.merchants.get(v.merchantId);
      if (!merchant) {
        throw new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_UNKNOWN_MERCHANT, `merchant "${v.merchantId}" is not registered at this payment server`);
      }
      if (merchant.mode !== v.mode) {
        throw invalidField("draw_request.confirmation_mode", `merchant "${v.merchantId}" confirms with ${confirmationModeToJSON(merchant.mode)}`);
      }
      if (v.mode !== ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES) {
        throw new NetpurseError(Status.UNIMPLEMENTED, ErrorReason.ERROR_REASON_UNSPECIFIED, `confirmation mode ${confirmationModeToJSON(v.mode)} is not implemented by this payment server`);
      }
      let row = await this.o.store.get(v.transactionId);
      if (row) {
        if (row.request_hash !== hash) {
          throw new NetpurseError(Status.ALREADY_EXISTS, ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED, `transaction ${v.transactionId} was already used with another draw request`);
        }
        if (row.state === "REFUSED") throw this.storedError(row);
        if (row.state !== "RECEIVED") return this.debitCommandResponse(row);
        await this.o.store.log(v.transactionId, { step: "draw_request_retried", detail: "no debit command had been issued; trying again" });
      } else {
        const inserted = await this.o.store.insert(
          {
            transaction_id: v.transactionId,
            request_hash: hash,
            merchant_id: v.merchantId,
            amount_minor: v.amount,
            currency: v.currency,
            exponent: v.exponent,
            purse_id: v.card.purseId.toString("hex"),
            card_counter: v.card.counter,
            key_version: v.card.keyVersion,
            confirmation_mode: v.mode,
            state: "RECEIVED",
            terminal_id: null,
            psam_id: null,
            psam_counter: null,
            debit_command: null,
            completion_token: randomBytes(16),
            completion_hash: null,
            card_status_word: null,
            debit_response: null,
            new_balance: null,
            confirmation: null,
            error_code: null,
            error_reason: null,
            error_message: null,
          },
          {
            step: "draw_request_received",
            detail: `purse ${v.card.purseId.toString("hex")} counter ${v.card.counter} pays ${formatMoney({ amountMinor: v.amount, currency: v.currency, exponent: v.exponent })} to ${v.merchantId}`,
          },
        );
        if (!inserted) throw new NetpurseError(Status.ABORTED, ErrorReason.ERROR_REASON_UNSPECIFIED, "concurrent draw request for the same transaction; retry");
      }
      row = (await this.o.store.get(v.transactionId))!;
      if (v.card.currency !== v.currency) {
        return this.refuse(row, new NetpurseError(Status.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_CURRENCY_MISMATCH, `the card holds currency ${v.card.currency}, the offer is in ${v.currency}; nothing was debited`));
      }
      return this.issueDebitCommand(row, v.cardAtr, v.initializeResponse, deadline);
    });
  }

  private async refuse(row: PurchaseRow, e: NetpurseError): Promise<never> {
    await this.o.store.transition(row.transaction_id, ["RECEIVED"], { state: "REFUSED", error_code: e.code, error_reason: e.reason, error_message: e.details }, { step: "refused", detail: e.details });
    throw e;
  }

  private storedError(row: PurchaseRow): NetpurseError {
    return new NetpurseError(row.error_code ?? Status.FAILED_PRECONDITION, row.error_reason ?? ErrorReason.ERROR_REASON_UNSPECIFIED, row.error_message ?? `transaction ended ${row.state}`);
  }

  private debitCommandResponse(row: PurchaseRow): ProcessDrawRequestResponse {
    return {
      transactionId: txnId(row.transaction_id),
      debitCommand: row.debit_command!,
      terminalId: row.terminal_id!,
      psamId: psamId(row.psam_id!),
      psamCounter: row.psam_counter!,
      completionToken: row.completion_token!,
    };
  }

  private async issueDebitCommand(row: PurchaseRow, cardAtr: Buffer, initializeResponse: Buffer, deadline: number): Promise<ProcessDrawRequestResponse> {
    const tried = new Set<string>();
    for (let attempt = 1; attempt <= 3; attempt++) {
      if (deadline - Date.now() < MIN_JOB_MS) {
        await this.o.store.log(row.transaction_id, { step: "deadline_too_close", detail: `less than ${MIN_JOB_MS} ms left before the caller's deadline` });
        throw new NetpurseError(Status.DEADLINE_EXCEEDED, ErrorReason.ERROR_REASON_UNSPECIFIED, `too little time left before the deadline to ask a PSAM (attempt ${attempt}); nothing was signed, retry with a longer deadline`);
      }
      let lease: Lease;
      try {
        lease = await this.o.pool.acquire({ currency: row.currency, keyVersion: row.key_version, exclude: tried }, deadline);
      } catch (e) {
        if (e instanceof NoPsamFits) {
          // Not stored as a refusal: it depends on the pool as it is now, and a retry may find a PSAM.
          const reason = e.what === "currency" ? ErrorReason.ERROR_REASON_CURRENCY_MISMATCH : ErrorReason.ERROR_REASON_KEY_VERSION_UNKNOWN;
          await this.o.store.log(row.transaction_id, { step: "no_psam_fits", detail: e.message });
          throw new NetpurseError(Status.FAILED_PRECONDITION, reason, `${e.message}; nothing was debited`);
        }
        if (!(e instanceof NoPsamFree)) throw e;
        await this.o.store.log(row.transaction_id, { step: "no_psam_free", detail: e.message });
        throw new NetpurseError(Status.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_NO_PSAM_FREE, `no PSAM became free before the deadline: ${e.message}; retry the same draw request later`);
      }
      tried.add(lease.key);
      await this.o.store.log(row.transaction_id, { step: "psam_assigned", detail: `terminal ${lease.terminalId} PSAM ${lease.psamId} (attempt ${attempt})` });
      const result = await this.o.link.runJob(
        lease,
        {
          transactionId: txnId(row.transaction_id),
          task: {
            $case: "issueDebitCommand",
            value: {
              cardAtr,
              initializeResponse,
              amount: money(row.amount_minor, row.currency, row.exponent),
              merchantId: merchantId(row.merchant_id),
              returnExpectedSignature: false,
            },
          },
        },
        this.jobTimeout(deadline),
      );
      if (result.status === PsamJobStatus.PSAM_JOB_STATUS_OK && result.outcome?.$case === "debitCommandIssued") {
        const issued = result.outcome.value;
        const moved = await this.o.store.transition(
          row.transaction_id,
          ["RECEIVED"],
          { state: "DEBIT_COMMAND_ISSUED", terminal_id: lease.terminalId, psam_id: lease.psamId, psam_counter: issued.psamCounter, debit_command: Buffer.from(issued.debitCommand) },
          { step: "debit_command_issued", detail: `PSAM ${lease.psamId} counter ${issued.psamCounter} signed the DEBIT command` },
        );
        if (!moved) {
          this.o.pool.release(lease);
          throw new NetpurseError(Status.ABORTED, ErrorReason.ERROR_REASON_WRONG_STATE, "the transaction changed state meanwhile; retry");
        }
        this.hold(row.transaction_id, lease);
        return this.debitCommandResponse((await this.o.store.get(row.transaction_id))!);
      }
      const full = result.statusWord === SW.BATCH_FULL || result.statusWord === SW.TOO_MANY_OPEN_DEBITS;
      if (result.status === PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED && !full) {
        this.o.pool.release(lease);
        return this.refuse(row, psamRefusal(result.statusWord));
      }
      // The PSAM could not take it (gone, failed, busy, full): no debit command
      // left this server, so the work goes to another PSAM. Only a PSAM that
      // is gone or failing leaves the pool; it returns when its terminal says so.
      this.o.log.warn("PSAM could not take the job; trying another", { transaction: row.transaction_id, psam: lease.psamId, status: PsamJobStatus[result.status], detail: result.message });
      const gone = [PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, PsamJobStatus.PSAM_JOB_STATUS_TERMINAL_LOST, PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM];
      if (gone.includes(result.status)) this.o.pool.markFailed(lease);
      this.o.pool.release(lease);
      await this.o.store.log(row.transaction_id, { step: "psam_unavailable", detail: `${PsamJobStatus[result.status]}: ${result.message}` });
    }
    throw new NetpurseError(Status.UNAVAILABLE, ErrorReason.ERROR_REASON_UNSPECIFIED, "no PSAM could take the transaction after 3 attempts; retry the same draw request later");
  }

  private jobTimeout(deadline: number): number {
    return Math.max(MIN_JOB_MS, Math.min(this.jobTimeoutMs, deadline - Date.now()));
  }

  /** Keeps the PSAM for the cardholder's answer, but not forever. */
  private hold(transactionId: string, lease: Lease): void {
    const timer = setTimeout(() => {
      if (this.holds.get(transactionId)?.lease !== lease) return;
      this.holds.delete(transactionId);
      this.o.pool.release(lease);
      void this.o.store.log(transactionId, { step: "psam_hold_expired", detail: `no card answer within ${this.holdTimeoutMs} ms; PSAM ${lease.psamId} back to the pool, its debit stays open` });
    }, this.holdTimeoutMs);
    timer.unref();
    this.holds.set(transactionId, { lease, timer });
  }

  private takeHold(transactionId: string): Lease | undefined {
    const h = this.holds.get(transactionId);
    if (!h) return undefined;
    clearTimeout(h.timer);
    this.holds.delete(transactionId);
    return h.lease;
  }

  // ---- steps 622-634: the card's answer -> confirmation ----------------------

  private async completePurchase(req: CompletePurchaseRequest, ctx: CallContext): Promise<CompletePurchaseResponse> {
    const id = requireTransactionId(req.transactionId);
    const sw = req.cardStatusWord;
    if (sw < 0x6000 || sw > 0xffff) throw invalidField("card_status_word", `0x${sw.toString(16)} is not an ISO 7816 status word`);
    if (sw === SW.OK && req.debitResponse.length !== DebitResponse.size) {
      throw invalidField("debit_response", `must be the card's ${DebitResponse.size}-byte answer when card_status_word is 9000, got ${req.debitResponse.length} bytes`);
    }
    if (sw !== SW.OK && req.debitResponse.length !== 0) throw invalidField("debit_response", "must be empty when the card answered with an error status word");
    const hash = sha256(CompletePurchaseRequest.encode(req).finish());
    const deadline = this.deadline(ctx, this.maxPsamWaitMs);
    return this.serial(id, async () => {
      const row = await this.o.store.get(id);
      if (!row) throw notFound(`transaction ${id} is unknown to this payment server`);
      if (!row.completion_token || !macEqual(row.completion_token, req.completionToken)) {
        throw new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_WRONG_COMPLETION_TOKEN, `completion_token is not transaction ${id}'s: only the client that sent the draw request may complete it`);
      }
      switch (row.state) {
        case "RECEIVED":
        case "REFUSED":
          throw new NetpurseError(Status.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_WRONG_STATE, `no DEBIT command was issued for transaction ${id} (state ${row.state})`);
        case "DEBIT_COMMAND_ISSUED": {
          await this.o.store.transition(
            id,
            ["DEBIT_COMMAND_ISSUED"],
            { state: "DEBIT_RESPONSE_RECEIVED", completion_hash: hash, card_status_word: sw, debit_response: Buffer.from(req.debitResponse) },
            { step: "debit_response_received", detail: sw === SW.OK ? `card answered 9000, result ${req.debitResponse[0]}` : `card refused DEBIT with SW ${swHex(sw)}` },
          );
          return this.resolve((await this.o.store.get(id))!, deadline);
        }
        default:
          if (row.completion_hash !== hash) {
            throw new NetpurseError(Status.ALREADY_EXISTS, ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED, `a different card answer was already submitted for transaction ${id}`);
          }
          if (row.state === "COMPLETED") return this.completedResponse(row);
          if (row.state === "REVERSED") throw this.storedError(row);
          return this.resolve(row, deadline);
      }
    });
  }

  private completedResponse(row: PurchaseRow): CompletePurchaseResponse {
    return {
      transactionId: txnId(row.transaction_id),
      newBalance: money(row.new_balance!, row.currency, row.exponent),
      confirmation: PurchaseConfirmation.decode(row.confirmation!),
    };
  }

  /**
   * Has the PSAM that signed the DEBIT command rule on the card's answer:
   * record a proven debit, reverse one the card did not make. When that PSAM
   * cannot be reached the purchase is in doubt, never guessed.
   */
  private async resolve(row: PurchaseRow, deadline: number): Promise<CompletePurchaseResponse> {
    const id = row.transaction_id;
    let lease = this.takeHold(id);
    if (!lease) {
      if (!this.o.pool.has(keyOf(row))) return this.inDoubt(row, `PSAM ${row.psam_id} of terminal ${row.terminal_id} is not in the pool`);
      try {
        lease = await this.o.pool.acquire({ key: keyOf(row) }, Math.min(deadline, Date.now() + 5_000));
      } catch (e) {
        if (e instanceof NoPsamFree) return this.inDoubt(row, e.message);
        throw e;
      }
    }
    try {
      if (row.card_status_word !== SW.OK) {
        const reversed = await this.reverse(row, lease, deadline);
        if (!reversed.ok) return this.inDoubt(row, reversed.why);
        const e = new NetpurseError(
          Status.FAILED_PRECONDITION,
          ErrorReason.ERROR_REASON_CARD_REFUSED,
          `the card refused the DEBIT command (SW ${swHex(row.card_status_word!)}); the transaction was reversed in the PSAM and nothing was debited`,
        );
        await this.finish(row, "REVERSED", e, "reversed_card_error");
        throw e;
      }
      const result = await this.runOn(lease, row, { $case: "verifyDebit", value: { psamCounter: row.psam_counter!, cardStatusWord: SW.OK, debitResponse: row.debit_response! } }, deadline);
      if (result.status === PsamJobStatus.PSAM_JOB_STATUS_OK && result.outcome?.$case === "debitVerified") {
        const verified = result.outcome.value;
        if (verified.verdict === DebitVerdict.DEBIT_VERDICT_RECORDED) return await this.confirm(row);
        const e = cardDeclined(verified.cardResult);
        await this.finish(row, "REVERSED", e, "declined_by_card");
        throw e;
      }
      if (result.status === PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED && result.statusWord === SW.SECURITY_STATUS_NOT_SATISFIED) {
        const reversed = await this.reverse(row, lease, deadline);
        if (!reversed.ok) return this.inDoubt(row, reversed.why);
        const e = new NetpurseError(
          Status.PERMISSION_DENIED,
          ErrorReason.ERROR_REASON_BAD_SIGNATURE,
          `the card signature does not verify (PSAM SW ${swHex(result.statusWord)}); the transaction was reversed in the PSAM`,
        );
        await this.finish(row, "REVERSED", e, "reversed_bad_card_signature");
        throw e;
      }
      return this.inDoubt(row, `PSAM could not rule: ${PsamJobStatus[result.status]} ${result.statusWord ? `SW ${swHex(result.statusWord)} ` : ""}${result.message}`);
    } finally {
      this.o.pool.release(lease);
    }
  }

  private runOn(lease: Lease, row: PurchaseRow, task: PsamJob["task"], deadline: number): Promise<PsamJobResult> {
    return this.o.link.runJob(lease, { transactionId: txnId(row.transaction_id), task }, this.jobTimeout(Math.max(deadline, Date.now() + 1_000)));
  }

  private async reverse(row: PurchaseRow, lease: Lease, deadline: number): Promise<{ ok: true } | { ok: false; why: string }> {
    const r = await this.runOn(lease, row, { $case: "reverseDebit", value: { psamCounter: row.psam_counter! } }, deadline);
    if (r.status === PsamJobStatus.PSAM_JOB_STATUS_OK) return { ok: true };
    return { ok: false, why: `reversal not confirmed by the PSAM: ${PsamJobStatus[r.status]} ${r.statusWord ? `SW ${swHex(r.statusWord)} ` : ""}${r.message}` };
  }

  private async finish(row: PurchaseRow, state: State, e: NetpurseError, step: string): Promise<void> {
    await this.o.store.transition(row.transaction_id, ["DEBIT_RESPONSE_RECEIVED", "IN_DOUBT"], { state, error_code: e.code, error_reason: e.reason, error_message: e.details }, { step, detail: e.details });
  }

  private async inDoubt(row: PurchaseRow, why: string): Promise<never> {
    await this.o.store.transition(row.transaction_id, ["DEBIT_RESPONSE_RECEIVED", "IN_DOUBT"], { state: "IN_DOUBT" }, { step: "in_doubt", detail: why });
    throw new NetpurseError(
      Status.UNAVAILABLE,
      ErrorReason.ERROR_REASON_IN_DOUBT,
      `the purchase is in doubt: ${why}. The card's answer is recorded and the purchase will be settled when that PSAM returns; call CompletePurchase again later`,
    );
  }

  private async confirm(row: PurchaseRow): Promise<CompletePurchaseResponse> {
    const merchant = await this.o.merchants.get(row.merchant_id);
    if (!merchant) throw new NetpurseError(Status.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_UNKNOWN_MERCHANT, `merchant ${row.merchant_id} is no longer registered; the debit is recorded`);
    const answer = DebitResponse.decode(row.debit_response!);
    const confirmedAt = new Date();
    const fields = {
      transactionId: row.transaction_id,
      merchantId: row.merchant_id,
      amount: row.amount_minor,
      currency: row.currency,
      exponent: row.exponent,
      purseId: Buffer.from(row.purse_id, "hex"),
      psamId: Buffer.from(row.psam_id!, "hex"),
      psamCounter: row.psam_counter!,
      confirmedAtMs: confirmedAt.getTime(),
    };
    const confirmation: PurchaseConfirmation = {
      transactionId: txnId(row.transaction_id),
      merchantId: merchantId(row.merchant_id),
      amount: money(row.amount_minor, row.currency, row.exponent),
      purseId: purseId(row.purse_id),
      psamId: psamId(row.psam_id!),
      psamCounter: row.psam_counter!,
      confirmedAt,
      mac: confirmationMac(merchant.key, fields),
    };
    await this.o.store.transition(
      row.transaction_id,
      ["DEBIT_RESPONSE_RECEIVED", "IN_DOUBT"],
      { state: "COMPLETED", new_balance: answer.balance, confirmation: Buffer.from(PurchaseConfirmation.encode(confirmation).finish()) },
      { step: "purchase_confirmed", detail: `PSAM ${row.psam_id} verified the card signature and recorded the debit; card balance now ${answer.balance}` },
    );
    return this.completedResponse((await this.o.store.get(row.transaction_id))!);
  }

  // ---- records and recovery ----------------------------------------------------

  private async getPurchase(id: string): Promise<GetPurchaseResponse> {
    const row = await this.o.store.get(id);
    if (!row) throw notFound(`transaction ${id} is unknown to this payment server`);
    const events = await this.o.store.events(id);
    return {
      purchase: {
        transactionId: txnId(row.transaction_id),
        merchantId: merchantId(row.merchant_id),
        amount: money(row.amount_minor, row.currency, row.exponent),
        purseId: purseId(row.purse_id),
        state: stateEnum[row.state],
        terminalId: row.terminal_id ?? "",
        psamId: row.psam_id ? psamId(row.psam_id) : undefined,
        psamCounter: row.psam_counter ?? 0,
        confirmationMode: row.confirmation_mode,
        events: events.map((e) => ({ time: new Date(e.at), step: e.step, detail: e.detail })),
        createdAt: new Date(row.created_at),
        updatedAt: new Date(row.updated_at),
      },
    };
  }

  /**
   * A terminal (re)attached: settle what waited for its PSAMs, and reverse
   * debits its PSAMs hold open that never left this server.
   */
  onTerminal(t: TerminalInfo): void {
    for (const slot of t.slots) this.onSlot(t.terminalId, slot);
  }

  /**
   * A PSAM's state as a late job result reported it (we had given up on the
   * job): its open debits may include one whose DEBIT command never left.
   */
  onSlot(terminalId: string, slot: PsamSlot): void {
    void this.reconcile(terminalId, slot).catch((e) => this.o.log.error("reconciliation failed", { terminal: terminalId, error: (e as Error).message }));
  }

  private async reconcile(terminalId: string, slot: PsamSlot): Promise<void> {
    const psam = hexOf(slot.psamId?.value);
    const waiting = await this.o.store.onPsam(psam, ["DEBIT_RESPONSE_RECEIVED", "IN_DOUBT"]);
    await this.settleWaiting(waiting.filter((row) => row.terminal_id === terminalId));
    for (const p of slot.pendingDebits) {
      const id = p.transactionId?.value ?? "";
      await this.serial(id, async () => {
        const row = id ? await this.o.store.get(id) : undefined;
        if (!row) return; // not ours (another payment server's, or an operator's test)
        const live = row.psam_id === psam && row.psam_counter === p.psamCounter && row.state !== "RECEIVED" && row.state !== "REFUSED";
        if (live) return;
        const lease = await this.o.pool.acquire({ key: `${terminalId}/${psam}` }, Date.now() + 5_000).catch(() => undefined);
        if (!lease) return;
        try {
          const r = await this.o.link.runJob(lease, { transactionId: txnId(id), task: { $case: "reverseDebit", value: { psamCounter: p.psamCounter } } }, this.jobTimeoutMs);
          if (r.status === PsamJobStatus.PSAM_JOB_STATUS_OK) {
            await this.o.store.log(id, { step: "orphan_debit_reversed", detail: `PSAM ${psam} counter ${p.psamCounter}: its DEBIT command never left this server` });
          }
        } finally {
          this.o.pool.release(lease);
        }
      });
    }
  }

  /**
   * Settles, every `everyMs` and once now, purchases whose card answer is
   * recorded but whose PSAM has not ruled (it was busy, or away and back).
   */
  startSweeping(everyMs = 15_000): void {
    const tick = () => {
      void this.sweep()
        .catch((e) => this.o.log.error("sweep failed", { error: (e as Error).message }))
        .finally(() => {
          if (this.sweeping === undefined) return;
          this.sweeping = setTimeout(tick, everyMs);
          this.sweeping.unref();
        });
    };
    this.sweeping = setTimeout(tick, 0);
    this.sweeping.unref();
  }

  private sweeping: NodeJS.Timeout | undefined;

  private async sweep(): Promise<void> {
    const waiting = await this.o.store.inStates(["DEBIT_RESPONSE_RECEIVED", "IN_DOUBT"]);
    await this.settleWaiting(waiting.filter((row) => this.o.pool.has(keyOf(row))));
  }

  /** Has each purchase's PSAM rule on the card answer it recorded; the outcome lands in the record. */
  private async settleWaiting(rows: PurchaseRow[]): Promise<void> {
    for (const row of rows) {
      await this.serial(row.transaction_id, async () => {
        const fresh = (await this.o.store.get(row.transaction_id))!;
        if (fresh.state !== "DEBIT_RESPONSE_RECEIVED" && fresh.state !== "IN_DOUBT") return;
        await this.resolve(fresh, Date.now() + 10_000).then(
          () => this.o.log.info("waiting purchase settled", { transaction: row.transaction_id }),
          (e) => this.o.log.info("waiting purchase resolved", { transaction: row.transaction_id, outcome: (e as NetpurseError).details }),
        );
      });
    }
  }

  async close(): Promise<void> {
    clearTimeout(this.sweeping);
    this.sweeping = undefined;
    for (const [id] of this.holds) {
      const l = this.takeHold(id);
      if (l) this.o.pool.release(l);
    }
  }
}

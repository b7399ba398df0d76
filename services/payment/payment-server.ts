// The payment server (payment module 228): it opens the sealed draw request,
// has a PSAM in the pool sign the DEBIT command (and, in the modes of FIG.
// 6-8, predict the card's signature), rules on the card's answer or takes
// the card's proof after the fact, and confirms the purchase to the merchant
// with a debit result M only the merchant can read. Every step is in the
// database before the server answers; every RPC is idempotent by transaction
// id; a restart resumes from the log.

import { createHash, randomBytes } from "node:crypto";
import { Status, type CallContext } from "nice-grpc";
import { ConfirmationMode, confirmationModeToJSON, ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import {
  CardAnswer,
  DebitResultC,
  DebitResultM,
  DebitResultStatus,
  DrawRequest,
  IssuedDebitCommand,
  PurchaseState,
  type CompletePurchaseRequest,
  type CompletePurchaseResponse,
  type GetPurchaseResponse,
  type PaymentServiceImplementation,
  type ProcessDrawRequestRequest,
  type ProcessDrawRequestResponse,
  type ReportCardSignatureRequest,
  type ReportCardSignatureResponse,
} from "../../gen/netpurse/payment/v1/payment.js";
import { PsamJobStatus, type PsamSlot, type TerminalInfo } from "../../gen/netpurse/terminal/v1/terminal.js";
import { SW } from "../../lib/apdu/apdu.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { invalidField, NetpurseError, notFound } from "../../lib/grpc/errors.js";
import { callDeadline } from "../../lib/grpc/server.js";
import { hexOf, merchantId, psamId, purseId, requireMerchantId, requireTransactionId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { formatMoney, money } from "../../lib/money.js";
import { open, seal } from "../../lib/protocol/encryption-layer.js";
import { DebitResponse, LogRecord } from "../../lib/protocol/purse.js";
import { editDrawRequest } from "./draw-request.js";
import type { Merchant, MerchantRegistry } from "./merchants.js";
import { MIN_JOB_MS, psamKeyOf, PsamWork } from "./psam-work.js";
import { psamRefusal, sealBroken } from "./refusals.js";
import { Ruling } from "./ruling.js";
import type { PaymentStore, PurchaseRow, State } from "./store.js";
import { NoPsamFits, NoPsamFree, type ConcentratorLink, type Lease, type PsamPool } from "./terminal-pool.js";
import { decodeSealed, encodeSealed, keysFor, type TransactionKeys } from "./transaction-keys.js";

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
  /** How long a DEBIT command may wait for the card's proof before the purchase is in doubt. */
  proofTimeoutMs?: number;
}

const sha256 = (...parts: Uint8Array[]) => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest("hex");
};

const stateEnum: Record<State, PurchaseState> = {
  RECEIVED: PurchaseState.PURCHASE_STATE_RECEIVED,
  DEBIT_COMMAND_ISSUED: PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED,
  DEBIT_RESPONSE_RECEIVED: PurchaseState.PURCHASE_STATE_DEBIT_RESPONSE_RECEIVED,
  PROVEN: PurchaseState.PURCHASE_STATE_PROVEN,
  COMPLETED: PurchaseState.PURCHASE_STATE_COMPLETED,
  REVERSED: PurchaseState.PURCHASE_STATE_REVERSED,
  REFUSED: PurchaseState.PURCHASE_STATE_REFUSED,
  IN_DOUBT: PurchaseState.PURCHASE_STATE_IN_DOUBT,
};

/** Paid: the card's signature is proven (and, for COMPLETED, in the PSAM's batch). */
const PAID: State[] = ["PROVEN", "COMPLETED"];

/** At most this many card log records travel with a draw request. */
const MAX_CARD_LOG = 8;

export class PaymentServer {
  private readonly serials = new Map<string, Promise<unknown>>();
  private readonly work: PsamWork;
  private readonly ruling: Ruling;
  private readonly maxPsamWaitMs: number;
  private readonly proofTimeoutMs: number;

  constructor(private readonly o: PaymentServerOptions) {
    this.maxPsamWaitMs = o.maxPsamWaitMs ?? 10_000;
    this.proofTimeoutMs = o.proofTimeoutMs ?? 10 * 60_000;
    this.work = new PsamWork({
      pool: o.pool,
      link: o.link,
      store: o.store,
      log: o.log,
      holdTimeoutMs: o.holdTimeoutMs ?? 60_000,
      jobTimeoutMs: o.jobTimeoutMs ?? 10_000,
    });
    this.ruling = new Ruling({ store: o.store, work: this.work, log: o.log, serial: (id, fn) => this.serial(id, fn) });
  }

  readonly service: PaymentServiceImplementation = {
    processDrawRequest: (req, ctx) => this.processDrawRequest(req, ctx),
    completePurchase: (req, ctx) => this.completePurchase(req, ctx),
    reportCardSignature: (req, ctx) => this.reportCardSignature(req, ctx),
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

  private async merchant(id: string): Promise<Merchant> {
    const m = await this.o.merchants.get(id);
    if (!m)
      throw new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_UNKNOWN_MERCHANT, `merchant "${id}" is not registered at this payment server`);
    return m;
  }

  /** The keys of a recorded transaction, derived again from the merchant's key and the offer's nonce and ETSK. */
  private async keysOf(row: PurchaseRow): Promise<TransactionKeys> {
    return keysFor(await this.merchant(row.merchant_id), row.transaction_id, row.key_nonce!, decodeSealed(row.encrypted_session_key!));
  }

  private storedError(row: PurchaseRow): NetpurseError {
    return new NetpurseError(
      row.error_code ?? Status.FAILED_PRECONDITION,
      row.error_reason ?? ErrorReason.ERROR_REASON_UNSPECIFIED,
      row.error_message ?? `transaction ended ${row.state}`,
    );
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
    const plain = open(keys.tsk, "DRAW_REQUEST", id, req.drawRequest);
    if (!plain) throw sealBroken("the draw request");
    let dr: DrawRequest;
    try {
      dr = DrawRequest.decode(plain);
    } catch {
      throw invalidField("draw_request", "is not a DrawRequest");
    }
    const v = editDrawRequest(dr);
    if (v.transactionId !== id) throw invalidField("draw_request.transaction_id", "is not the request's transaction_id");
    if (v.merchantId !== mid) throw invalidField("draw_request.merchant_id", "is not the request's merchant_id");
    if (dr.cardLog.length > MAX_CARD_LOG) throw invalidField("draw_request.card_log", `at most ${MAX_CARD_LOG} records`);
    const log = dr.cardLog.map((r, i) => {
      if (r.length !== LogRecord.size) throw invalidField(`draw_request.card_log[${i}]`, `must be ${LogRecord.size} bytes`);
      try {
        return LogRecord.decode(r);
      } catch {
        throw invalidField(`draw_request.card_log[${i}]`, "is not a card log record");
      }
    });
    // The content decides idempotency, not its sealing (a re-sealed retry has a new nonce).
    const hash = sha256(Buffer.from(DrawRequest.encode({ ...dr, cardLog: [] }).finish()), req.keyNonce);
    const deadline = this.deadline(ctx, this.maxPsamWaitMs);
    return this.serial(id, async () => {
      if (merchant.mode !== v.mode) {
        throw invalidField("draw_request.confirmation_mode", `merchant "${mid}" confirms with ${confirmationModeToJSON(merchant.mode)}`);
      }
      let row = await this.o.store.get(id);
      if (row) {
        if (row.request_hash !== hash) {
          throw new NetpurseError(
            Status.ALREADY_EXISTS,
            ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
            `transaction ${id} was already used with another draw request`,
          );
        }
        if (row.state === "REFUSED") throw this.storedError(row);
        if (row.state !== "RECEIVED") return this.debitCommandResponse(row, keys);
        await this.o.store.log(id, { step: "draw_request_retried", detail: "no debit command had been issued; trying again" });
      } else {
        await this.insert(id, hash, v, req);
      }
      row = (await this.o.store.get(id))!;
      this.settleFromCardLog(row.purse_id, log);
      if (v.card.currency !== v.currency) {
        return this.refuse(
          row,
          new NetpurseError(
            Status.FAILED_PRECONDITION,
            ErrorReason.ERROR_REASON_CURRENCY_MISMATCH,
            `the card holds currency ${v.card.currency}, the offer is in ${v.currency}; nothing was debited`,
          ),
        );
      }
      row = await this.issueDebitCommand(row, v.cardAtr, v.initializeResponse, deadline);
      return this.debitCommandResponse(row, keys);
    });
  }

  private async insert(id: string, hash: string, v: ReturnType<typeof editDrawRequest>, req: ProcessDrawRequestRequest): Promise<void> {
    const inserted = await this.o.store.insert(
      {
        transaction_id: id,
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
        key_nonce: Buffer.from(req.keyNonce),
        encrypted_session_key: encodeSealed(req.encryptedSessionKey!),
        expected_card_signature: null,
      },
      {
        step: "draw_request_received",
        detail: `${confirmationModeToJSON(v.mode).replace("CONFIRMATION_MODE_", "")}: purse ${v.card.purseId.toString("hex")} counter ${v.card.counter} pays ${formatMoney({ amountMinor: v.amount, currency: v.currency, exponent: v.exponent })} to ${v.merchantId}`,
      },
    );
    if (!inserted) throw new NetpurseError(Status.ABORTED, ErrorReason.ERROR_REASON_UNSPECIFIED, "concurrent draw request for the same transaction; retry");
  }

  private async refuse(row: PurchaseRow, e: NetpurseError): Promise<never> {
    await this.o.store.transition(
      row.transaction_id,
      ["RECEIVED"],
      { state: "REFUSED", error_code: e.code, error_reason: e.reason, error_message: e.details },
      { step: "refused", detail: e.details },
    );
    throw e;
  }

  /** The DEBIT command for the client under the TSK and, in the one-round-trip modes, the debit result M for the merchant. */
  private debitCommandResponse(row: PurchaseRow, keys: TransactionKeys): ProcessDrawRequestResponse {
    const mode = row.confirmation_mode as ConfirmationMode;
    const command: IssuedDebitCommand = {
      debitCommand: row.debit_command!,
      terminalId: row.terminal_id!,
      psamId: psamId(row.psam_id!),
      psamCounter: row.psam_counter!,
      completionToken: row.completion_token!,
      expectedCardSignature: mode === ConfirmationMode.CONFIRMATION_MODE_CLIENT_COMPARES ? row.expected_card_signature! : Buffer.alloc(0),
    };
    const oneRoundTrip = mode === ConfirmationMode.CONFIRMATION_MODE_CLIENT_COMPARES || mode === ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES;
    return {
      transactionId: txnId(row.transaction_id),
      debitCommand: seal(keys.tsk, "DEBIT_COMMAND", row.transaction_id, IssuedDebitCommand.encode(command).finish()),
      debitResultM: oneRoundTrip ? this.sealResultM(row, keys, DebitResultStatus.DEBIT_RESULT_STATUS_DEBIT_COMMAND_ISSUED) : undefined,
    };
  }

  private sealResultM(row: PurchaseRow, keys: TransactionKeys, status: DebitResultStatus) {
    const m: DebitResultM = {
      transactionId: txnId(row.transaction_id),
      merchantId: merchantId(row.merchant_id),
      amount: money(row.amount_minor, row.currency, row.exponent),
      purseId: purseId(row.purse_id),
      psamId: psamId(row.psam_id!),
      psamCounter: row.psam_counter!,
      confirmationMode: row.confirmation_mode,
      status,
      expectedCardSignature: row.confirmation_mode === ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES ? row.expected_card_signature! : Buffer.alloc(0),
      issuedAt: new Date(),
    };
    return seal(keys.derived, "DEBIT_RESULT_M", row.transaction_id, DebitResultM.encode(m).finish());
  }

  private async issueDebitCommand(row: PurchaseRow, cardAtr: Buffer, initializeResponse: Buffer, deadline: number): Promise<PurchaseRow> {
    const mode = row.confirmation_mode as ConfirmationMode;
    const psamVerifies = mode === ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES;
    const tried = new Set<string>();
    for (let attempt = 1; attempt <= 3; attempt++) {
      if (deadline - Date.now() < MIN_JOB_MS) {
        await this.o.store.log(row.transaction_id, { step: "deadline_too_close", detail: `less than ${MIN_JOB_MS} ms left before the caller's deadline` });
        throw new NetpurseError(
          Status.DEADLINE_EXCEEDED,
          ErrorReason.ERROR_REASON_UNSPECIFIED,
          `too little time left before the deadline to ask a PSAM (attempt ${attempt}); nothing was signed, retry with a longer deadline`,
        );
      }
      const lease = await this.takePsam(row, tried, deadline);
      tried.add(lease.key);
      await this.o.store.log(row.transaction_id, { step: "psam_assigned", detail: `terminal ${lease.terminalId} PSAM ${lease.psamId} (attempt ${attempt})` });
      const result = await this.work.run(
        lease,
        row.transaction_id,
        {
          $case: "issueDebitCommand",
          value: {
            cardAtr,
            initializeResponse,
            amount: money(row.amount_minor, row.currency, row.exponent),
            merchantId: merchantId(row.merchant_id),
            returnExpectedSignature: !psamVerifies,
          },
        },
        deadline,
      );
      if (result.status === PsamJobStatus.PSAM_JOB_STATUS_OK && result.outcome?.$case === "debitCommandIssued") {
        const issued = result.outcome.value;
        const moved = await this.o.store.transition(
          row.transaction_id,
          ["RECEIVED"],
          {
            state: "DEBIT_COMMAND_ISSUED",
            terminal_id: lease.terminalId,
            psam_id: lease.psamId,
            psam_counter: issued.psamCounter,
            debit_command: Buffer.from(issued.debitCommand),
            expected_card_signature: psamVerifies ? null : Buffer.from(issued.expectedCardSignature),
          },
          {
            step: "debit_command_issued",
            detail: `PSAM ${lease.psamId} counter ${issued.psamCounter} signed the DEBIT command${psamVerifies ? "" : " and gave the card signature it expects"}`,
          },
        );
        if (!moved) {
          this.o.pool.release(lease);
          throw new NetpurseError(Status.ABORTED, ErrorReason.ERROR_REASON_WRONG_STATE, "the transaction changed state meanwhile; retry");
        }
        // FIG. 5 holds the PSAM for the card's answer; FIG. 6-8 release it now.
        if (psamVerifies) this.work.hold(row.transaction_id, lease);
        else await this.work.giveBack(row.transaction_id, lease, "the DEBIT command came with the expected card signature");
        return (await this.o.store.get(row.transaction_id))!;
      }
      const full = result.statusWord === SW.BATCH_FULL || result.statusWord === SW.TOO_MANY_OPEN_DEBITS;
      if (result.status === PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED && !full) {
        this.o.pool.release(lease);
        return this.refuse(row, psamRefusal(result.statusWord));
      }
      // The PSAM could not take it (gone, failed, busy, full): no debit command
      // left this server, so the work goes to another PSAM. Only a PSAM that
      // is gone or failing leaves the pool; it returns when its terminal says so.
      this.o.log.warn("PSAM could not take the job; trying another", {
        transaction: row.transaction_id,
        psam: lease.psamId,
        status: PsamJobStatus[result.status],
        detail: result.message,
      });
      const gone = [PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, PsamJobStatus.PSAM_JOB_STATUS_TERMINAL_LOST, PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM];
      if (gone.includes(result.status)) this.o.pool.markFailed(lease);
      this.o.pool.release(lease);
      await this.o.store.log(row.transaction_id, { step: "psam_unavailable", detail: `${PsamJobStatus[result.status]}: ${result.message}` });
    }
    throw new NetpurseError(
      Status.UNAVAILABLE,
      ErrorReason.ERROR_REASON_UNSPECIFIED,
      "no PSAM could take the transaction after 3 attempts; retry the same draw request later",
    );
  }

  private async takePsam(row: PurchaseRow, tried: Set<string>, deadline: number): Promise<Lease> {
    try {
      return await this.o.pool.acquire({ currency: row.currency, keyVersion: row.key_version, exclude: tried }, deadline);
    } catch (e) {
      if (e instanceof NoPsamFits) {
        // Not stored as a refusal: it depends on the pool as it is now, and a retry may find a PSAM.
        const reason = e.what === "currency" ? ErrorReason.ERROR_REASON_CURRENCY_MISMATCH : ErrorReason.ERROR_REASON_KEY_VERSION_UNKNOWN;
        await this.o.store.log(row.transaction_id, { step: "no_psam_fits", detail: e.message });
        throw new NetpurseError(Status.FAILED_PRECONDITION, reason, `${e.message}; nothing was debited`);
      }
      if (!(e instanceof NoPsamFree)) throw e;
      await this.o.store.log(row.transaction_id, { step: "no_psam_free", detail: e.message });
      throw new NetpurseError(
        Status.RESOURCE_EXHAUSTED,
        ErrorReason.ERROR_REASON_NO_PSAM_FREE,
        `no PSAM became free before the deadline: ${e.message}; retry the same draw request later`,
      );
    }
  }

  // ---- steps 622-634: the card's answer -> debit results C and M ----------------

  private async completePurchase(req: CompletePurchaseRequest, ctx: CallContext): Promise<CompletePurchaseResponse> {
    const id = requireTransactionId(req.transactionId);
    if (!req.cardAnswer) throw invalidField("card_answer", "missing");
    const deadline = this.deadline(ctx, this.maxPsamWaitMs);
    return this.serial(id, async () => {
      let row = await this.o.store.get(id);
      if (!row) throw notFound(`transaction ${id} is unknown to this payment server`);
      if (!row.key_nonce)
        throw new NetpurseError(
          Status.FAILED_PRECONDITION,
          ErrorReason.ERROR_REASON_WRONG_STATE,
          `transaction ${id} has no keys: it never had a draw request opened`,
        );
      const keys = await this.keysOf(row);
      const plain = open(keys.tsk, "CARD_ANSWER", id, req.cardAnswer);
      if (!plain) throw sealBroken("the card answer");
      let a: CardAnswer;
      try {
        a = CardAnswer.decode(plain);
      } catch {
        throw invalidField("card_answer", "is not a CardAnswer");
      }
      if (!row.completion_token || !macEqual(row.completion_token, a.completionToken)) {
        throw new NetpurseError(
          Status.PERMISSION_DENIED,
          ErrorReason.ERROR_REASON_WRONG_COMPLETION_TOKEN,
          `completion_token is not transaction ${id}'s: only the client that sent the draw request may complete it`,
        );
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

      if (row.card_status_word !== null) {
        const same = row.card_status_word === sw && (row.debit_response ?? Buffer.alloc(0)).equals(Buffer.from(a.debitResponse));
        if (!same)
          throw new NetpurseError(
            Status.ALREADY_EXISTS,
            ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
            `a different card answer was already recorded for transaction ${id}`,
          );
      } else {
        if (!["DEBIT_COMMAND_ISSUED", "IN_DOUBT"].includes(row.state)) {
          if (row.state === "REVERSED") throw this.storedError(row);
          throw new NetpurseError(
            Status.FAILED_PRECONDITION,
            ErrorReason.ERROR_REASON_WRONG_STATE,
            `no DEBIT command is awaiting the card's answer for transaction ${id} (state ${row.state})`,
          );
        }
        await this.o.store.transition(
          id,
          ["DEBIT_COMMAND_ISSUED", "IN_DOUBT"],
          { state: "DEBIT_RESPONSE_RECEIVED", card_status_word: sw, debit_response: Buffer.from(a.debitResponse) },
          {
            step: "debit_response_received",
            detail: sw === SW.OK ? `card answered 9000, result ${a.debitResponse[0]}` : `card refused DEBIT with SW ${sw.toString(16).toUpperCase()}`,
          },
        );
        row = (await this.o.store.get(id))!;
      }
      if (row.state === "REVERSED") throw this.storedError(row);
      if (!PAID.includes(row.state)) row = await this.ruling.ruleStored(row, deadline);
      return this.results(row, keys);
    });
  }

  private results(row: PurchaseRow, keys: TransactionKeys): CompletePurchaseResponse {
    const c: DebitResultC = {
      transactionId: txnId(row.transaction_id),
      state: stateEnum[row.state],
      newBalance: money(row.new_balance ?? 0, row.currency, row.exponent),
    };
    return {
      transactionId: txnId(row.transaction_id),
      debitResultC: seal(keys.tsk, "DEBIT_RESULT_C", row.transaction_id, DebitResultC.encode(c).finish()),
      debitResultM: this.sealResultM(row, keys, DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED),
    };
  }

  // ---- the card's proof after the fact --------------------------------------------

  private async reportCardSignature(req: ReportCardSignatureRequest, ctx: CallContext): Promise<ReportCardSignatureResponse> {
    const id = requireTransactionId(req.transactionId);
    if (req.debitResponse.length !== DebitResponse.size)
      throw invalidField("debit_response", `must be the card's ${DebitResponse.size}-byte answer, got ${req.debitResponse.length} bytes`);
    const raw = Buffer.from(req.debitResponse);
    const deadline = this.deadline(ctx, this.maxPsamWaitMs);
    return this.serial(id, async () => {
      const row = await this.o.store.get(id);
      if (!row) throw notFound(`transaction ${id} is unknown to this payment server`);
      const after = await this.ruling.ruleReported(row, DebitResponse.decode(raw), raw, "reported", deadline);
      return { transactionId: txnId(id), state: stateEnum[after.state] };
    });
  }

  /**
   * The card's log came with its next draw request: purchases of this card
   * still waiting for its proof find it there (the debit with the card's
   * signature), and are settled without guessing.
   */
  private settleFromCardLog(purse: string, log: ReturnType<typeof LogRecord.decode>[]): void {
    for (const entry of log) {
      void this.serial(entry.transactionRef, async () => {
        const row = await this.o.store.get(entry.transactionRef);
        if (!row || row.purse_id !== purse || row.debit_response) return;
        if (row.psam_id !== entry.moduleId.toString("hex") || row.psam_counter !== entry.moduleCounter) return;
        if (!["DEBIT_COMMAND_ISSUED", "IN_DOUBT"].includes(row.state)) return;
        const answer = { result: 0, counter: entry.counter, balance: entry.balance, cardSignature: entry.cardSignature };
        await this.ruling.ruleReported(row, answer, DebitResponse.encode(answer), "from the card's log at its next contact", Date.now() + 10_000);
        this.o.log.info("purchase settled from the card's log", { transaction: row.transaction_id });
      }).catch((e) => this.o.log.warn("card log entry did not settle its purchase", { transaction: entry.transactionRef, error: (e as Error).message }));
    }
  }

  // ---- records ------------------------------------------------------------

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
        cardCounter: row.card_counter,
      },
    };
  }

  // ---- recovery -------------------------------------------------------------

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
    const waiting = await this.o.store.onPsam(psam, ["DEBIT_RESPONSE_RECEIVED", "IN_DOUBT", "PROVEN"]);
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
          const r = await this.work.run(lease, id, { $case: "reverseDebit", value: { psamCounter: p.psamCounter } }, Date.now() + 10_000);
          if (r.status === PsamJobStatus.PSAM_JOB_STATUS_OK) {
            await this.o.store.log(id, {
              step: "orphan_debit_reversed",
              detail: `PSAM ${psam} counter ${p.psamCounter}: its DEBIT command never left this server`,
            });
          }
        } finally {
          this.o.pool.release(lease);
        }
      });
    }
  }

  /**
   * Every `everyMs` and once now: settles purchases whose card answer is
   * recorded but not ruled on, records proven ones in their PSAM's batch,
   * and puts in doubt DEBIT commands whose proof did not come in time.
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

  async sweep(): Promise<void> {
    const waiting = await this.o.store.inStates(["DEBIT_RESPONSE_RECEIVED", "IN_DOUBT", "PROVEN"]);
    await this.settleWaiting(waiting.filter((row) => this.o.pool.has(psamKeyOf(row))));
    const before = new Date(Date.now() - this.proofTimeoutMs).toISOString();
    for (const row of await this.o.store.staleInStates(["DEBIT_COMMAND_ISSUED"], before)) {
      await this.serial(row.transaction_id, () =>
        this.o.store.transition(
          row.transaction_id,
          ["DEBIT_COMMAND_ISSUED"],
          { state: "IN_DOUBT" },
          {
            step: "no_proof_in_time",
            detail: `no card answer within ${this.proofTimeoutMs} ms; settled from the card's proof at its next contact`,
          },
        ),
      );
    }
  }

  /** Has each purchase's card answer ruled on, or its proof recorded; the outcome lands in the record. */
  private async settleWaiting(rows: PurchaseRow[]): Promise<void> {
    for (const row of rows) {
      await this.serial(row.transaction_id, async () => {
        const fresh = (await this.o.store.get(row.transaction_id))!;
        if (fresh.state === "PROVEN") {
          await this.ruling.recordProof(fresh);
          return;
        }
        if ((fresh.state !== "DEBIT_RESPONSE_RECEIVED" && fresh.state !== "IN_DOUBT") || fresh.card_status_word === null) return;
        await this.ruling.ruleStored(fresh, Date.now() + 10_000).then(
          () => this.o.log.info("waiting purchase settled", { transaction: row.transaction_id }),
          (e) => this.o.log.info("waiting purchase resolved", { transaction: row.transaction_id, outcome: (e as NetpurseError).details }),
        );
      });
    }
  }

  async close(): Promise<void> {
    clearTimeout(this.sweeping);
    this.sweeping = undefined;
    this.work.releaseAll();
  }
}

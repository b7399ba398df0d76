// Ruling on the card's answer to DEBIT. By mode, the PSAM verifies the card's
// signature (PSAM_VERIFIES), or the payment server compares it with the one
// the PSAM expected (the other modes, when the answer reaches it). A proven
// debit is recorded in the PSAM's batch; a refused or declined one, or one
// the card's later transactions prove it never made, is reversed in the
// PSAM; one whose PSAM cannot be reached is in doubt. Nothing is guessed.

import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { DebitVerdict, PsamJobStatus } from "../../gen/netpurse/terminal/v1/terminal.js";
import { SW } from "../../lib/apdu/apdu.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import type { Logger } from "../../lib/log.js";
import { DebitResponse, DebitResult, type DebitAnswer } from "../../lib/protocol/purse.js";
import { PsamUnreachable, describe, type PsamWork } from "./psam-work.js";
import { badCardSignature, cardDeclined, cardRefused, SW_PROVEN_NOT_DEBITED } from "./refusals.js";
import type { PaymentStore, PurchaseRow, State } from "./store.js";

/** A card's answer to DEBIT: its status word and, with 9000, its 17 bytes. */
export interface CardAnswer {
  sw: number;
  debitResponse: Buffer;
}

/** Where a card answer can still be ruled on. */
const OPEN: State[] = ["DEBIT_COMMAND_ISSUED", "DEBIT_RESPONSE_RECEIVED", "IN_DOUBT"];

export class Ruling {
  constructor(
    private readonly o: {
      store: PaymentStore;
      work: PsamWork;
      log: Logger;
      /** Runs a transaction's steps one at a time (shared with the RPC handlers). */
      serial<T>(transactionId: string, fn: () => Promise<T>): Promise<T>;
    },
  ) {}

  private async reload(row: PurchaseRow): Promise<PurchaseRow> {
    return (await this.o.store.get(row.transaction_id))!;
  }

  /** Rules on the card answer stored in the row (from CompletePurchase, or a proof that the card never debited). */
  async ruleStored(row: PurchaseRow, deadline: number): Promise<PurchaseRow> {
    const sw = row.card_status_word!;
    if (sw !== SW.OK) {
      const e = sw === SW_PROVEN_NOT_DEBITED ? this.neverDebited(row) : cardRefused(sw);
      return this.reverseAndFinish(row, e, sw === SW_PROVEN_NOT_DEBITED ? "reversed_never_debited" : "reversed_card_error", deadline);
    }
    const answer = DebitResponse.decode(row.debit_response!);
    if (this.isExpectedDebit(row, answer)) return this.prove(row, answer, "card_signature_matched", "the card's signature is the one the PSAM expected");
    // The PSAM rules: its own mode, or an answer that is not the expected debit (a decline, a bad signature).
    return this.verifyInPsam(row, answer, { reverseBadSignature: true, deadline });
  }

  /**
   * Rules on an answer reported after the fact (ReportCardSignature, or the
   * card's log at its next contact). A report proves itself or is refused;
   * it never reverses anything.
   */
  async ruleReported(row: PurchaseRow, answer: DebitAnswer, raw: Buffer, source: string, deadline: number): Promise<PurchaseRow> {
    if (row.debit_response) {
      if (row.card_status_word === SW.OK && row.debit_response.equals(raw)) return row; // a repeat: counted once
      throw new NetpurseError(
        Status.ALREADY_EXISTS,
        ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
        `another card answer was already recorded for transaction ${row.transaction_id}`,
      );
    }
    if (!OPEN.includes(row.state)) {
      throw new NetpurseError(
        Status.FAILED_PRECONDITION,
        ErrorReason.ERROR_REASON_WRONG_STATE,
        `transaction ${row.transaction_id} is ${row.state}: no card answer is awaited`,
      );
    }
    if (row.expected_card_signature) {
      if (!this.isExpectedDebit(row, answer)) {
        await this.o.store.log(row.transaction_id, { step: "report_refused", detail: `${source}: not the card signature the PSAM expected` });
        throw badCardSignature("it is not the signature the PSAM expected for this transaction");
      }
      return this.prove(row, answer, "card_signature_reported", `${source}: the card's signature is the one the PSAM expected`, raw);
    }
    return this.verifyInPsam(row, answer, { reverseBadSignature: false, deadline, raw, source });
  }

  private isExpectedDebit(row: PurchaseRow, a: DebitAnswer): boolean {
    return !!row.expected_card_signature && a.result === DebitResult.DEBITED && macEqual(a.cardSignature, row.expected_card_signature);
  }

  /** The card proved the debit: paid. Its proof goes into the PSAM's batch next. */
  private async prove(row: PurchaseRow, a: DebitAnswer, step: string, detail: string, raw?: Buffer): Promise<PurchaseRow> {
    await this.o.store.transition(
      row.transaction_id,
      OPEN,
      { state: "PROVEN", new_balance: a.balance, ...(raw ? { card_status_word: SW.OK, debit_response: raw } : {}) },
      { step, detail: `${detail}; card balance now ${a.balance}` },
    );
    const proven = await this.reload(row);
    this.afterProof(proven);
    void this.o
      .serial(row.transaction_id, () => this.recordProof(proven).then(() => undefined))
      .catch((e) => this.o.log.warn("proof not recorded yet", { transaction: row.transaction_id, error: (e as Error).message }));
    return proven;
  }

  /** PROVEN → COMPLETED: the PSAM records the card's proof in its batch. Retried by the sweep until it lands. */
  async recordProof(row: PurchaseRow): Promise<PurchaseRow> {
    const fresh = await this.reload(row);
    if (fresh.state !== "PROVEN") return fresh;
    const done = await this.o.work.onSigningPsam(fresh, Date.now() + 10_000, (lease) =>
      this.o.work.run(
        lease,
        fresh.transaction_id,
        { $case: "verifyDebit", value: { psamCounter: fresh.psam_counter!, cardStatusWord: SW.OK, debitResponse: fresh.debit_response! } },
        Date.now() + 10_000,
      ),
    );
    if (done instanceof PsamUnreachable) return fresh;
    if (
      done.status === PsamJobStatus.PSAM_JOB_STATUS_OK &&
      done.outcome?.$case === "debitVerified" &&
      done.outcome.value.verdict === DebitVerdict.DEBIT_VERDICT_RECORDED
    ) {
      await this.o.store.transition(
        fresh.transaction_id,
        ["PROVEN"],
        { state: "COMPLETED" },
        { step: "recorded_in_batch", detail: `PSAM ${fresh.psam_id} recorded the card's proof in batch ${done.outcome.value.batchNumber}` },
      );
    } else {
      // The PSAM disagrees with a signature it predicted itself: an operator must look.
      this.o.log.error("PSAM did not record a proven debit", { transaction: fresh.transaction_id, result: describe(done) });
      await this.o.store.log(fresh.transaction_id, { step: "proof_not_recorded", detail: describe(done) });
    }
    return this.reload(fresh);
  }

  private async verifyInPsam(
    row: PurchaseRow,
    answer: DebitAnswer,
    p: { reverseBadSignature: boolean; deadline: number; raw?: Buffer; source?: string },
  ): Promise<PurchaseRow> {
    const raw = p.raw ?? row.debit_response!;
    const outcome = await this.o.work.onSigningPsam(row, p.deadline, async (lease) => {
      const r = await this.o.work.run(
        lease,
        row.transaction_id,
        { $case: "verifyDebit", value: { psamCounter: row.psam_counter!, cardStatusWord: SW.OK, debitResponse: raw } },
        p.deadline,
      );
      if (r.status === PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED && r.statusWord === SW.SECURITY_STATUS_NOT_SATISFIED && p.reverseBadSignature) {
        const reversed = await this.o.work.reverse(row, lease, p.deadline);
        return { r, reversed };
      }
      return { r, reversed: undefined };
    });
    const stored = p.raw ? { card_status_word: SW.OK, debit_response: raw } : {};
    if (outcome instanceof PsamUnreachable) {
      if (p.raw)
        throw new NetpurseError(
          Status.UNAVAILABLE,
          ErrorReason.ERROR_REASON_IN_DOUBT,
          `cannot verify the reported answer now: ${outcome.why}; report it again later`,
        );
      return this.inDoubt(row, outcome.why);
    }
    const { r, reversed } = outcome;
    if (r.status === PsamJobStatus.PSAM_JOB_STATUS_OK && r.outcome?.$case === "debitVerified") {
      if (r.outcome.value.verdict === DebitVerdict.DEBIT_VERDICT_RECORDED) {
        await this.o.store.transition(
          row.transaction_id,
          OPEN,
          { state: "COMPLETED", new_balance: answer.balance, ...stored },
          {
            step: "purchase_confirmed",
            detail: `${p.source ? `${p.source}: ` : ""}PSAM ${row.psam_id} verified the card signature and recorded the debit; card balance now ${answer.balance}`,
          },
        );
        const done = await this.reload(row);
        this.afterProof(done);
        return done;
      }
      const e = cardDeclined(r.outcome.value.cardResult);
      await this.finish(row, "REVERSED", e, "declined_by_card", stored);
      this.afterProof(await this.reload(row));
      if (p.raw) return this.reload(row); // a reported decline is acknowledged: it is the card's truth
      throw e;
    }
    if (r.status === PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED && r.statusWord === SW.SECURITY_STATUS_NOT_SATISFIED) {
      if (!p.reverseBadSignature) throw badCardSignature("the PSAM that signed the DEBIT command rejects it");
      if (reversed !== true) return this.inDoubt(row, reversed!.why);
      const e = badCardSignature("the PSAM rejects it; the transaction was reversed in the PSAM");
      await this.finish(row, "REVERSED", e, "reversed_bad_card_signature");
      throw e;
    }
    if (p.raw)
      throw new NetpurseError(Status.UNAVAILABLE, ErrorReason.ERROR_REASON_IN_DOUBT, `the PSAM could not rule now (${describe(r)}); report it again later`);
    return this.inDoubt(row, `the PSAM could not rule: ${describe(r)}`);
  }

  private async reverseAndFinish(row: PurchaseRow, e: NetpurseError, step: string, deadline: number): Promise<never> {
    const reversed = await this.o.work.onSigningPsam(row, deadline, (lease) => this.o.work.reverse(row, lease, deadline));
    if (reversed !== true) return this.inDoubt(row, reversed.why);
    await this.finish(row, "REVERSED", e, step);
    throw e;
  }

  private neverDebited(row: PurchaseRow): NetpurseError {
    return new NetpurseError(
      Status.FAILED_PRECONDITION,
      ErrorReason.ERROR_REASON_CARD_REFUSED,
      `the card never made this debit: its counter ${row.card_counter} moved on through another proven transaction; the debit was reversed in the PSAM`,
    );
  }

  private async finish(row: PurchaseRow, state: State, e: NetpurseError, step: string, extra: Partial<PurchaseRow> = {}): Promise<void> {
    await this.o.store.transition(
      row.transaction_id,
      OPEN,
      { state, error_code: e.code, error_reason: e.reason, error_message: e.details, ...extra },
      { step, detail: e.details },
    );
  }

  private async inDoubt(row: PurchaseRow, why: string): Promise<never> {
    await this.o.store.transition(row.transaction_id, OPEN, { state: "IN_DOUBT" }, { step: "in_doubt", detail: why });
    throw new NetpurseError(
      Status.UNAVAILABLE,
      ErrorReason.ERROR_REASON_IN_DOUBT,
      `the purchase is in doubt: ${why}. The card's answer is recorded and the purchase will be settled when that PSAM returns; call again later`,
    );
  }

  /**
   * A card answer of this purchase is proven, so the card's counter at its
   * INITIALIZE is too (the session key binds it). Any other purchase of the
   * same purse made at that counter can never have been debited: its session
   * died with this one's INITIALIZE, and had it debited first, the counter
   * would have moved. Those are reversed in their PSAMs.
   */
  afterProof(proven: PurchaseRow): void {
    void (async () => {
      for (const other of await this.o.store.sameCardCounter(proven.purse_id, proven.card_counter, proven.transaction_id)) {
        if (other.debit_response || other.card_status_word !== null) continue;
        await this.o.serial(other.transaction_id, async () => {
          const moved = await this.o.store.transition(
            other.transaction_id,
            ["DEBIT_COMMAND_ISSUED", "IN_DOUBT"],
            { state: "DEBIT_RESPONSE_RECEIVED", card_status_word: SW_PROVEN_NOT_DEBITED },
            { step: "proven_not_debited", detail: `card counter ${proven.card_counter} went to transaction ${proven.transaction_id}, proven by the card` },
          );
          if (moved) await this.ruleStored((await this.reload(other))!, Date.now() + 10_000).catch(() => undefined);
        });
      }
    })().catch((e) => this.o.log.error("could not settle purchases the card proved it never made", { error: (e as Error).message }));
  }
}

// Ruling on the card's answer to DEBIT. By mode, the PSAM verifies the card's
// signature (PSAM_VERIFIES), or the payment server compares it with the one
// the PSAM expected (the other modes, when the answer reaches it). A proven
// debit is recorded in the PSAM's batch (an authentication, currency 999, is
// verified by the PSAM the same way and recorded nowhere); a refused or declined one, or one
// the card's log or later transactions prove it never made, is reversed in
// the PSAM; one whose PSAM cannot be reached is in doubt. Nothing is guessed,
// and nothing is taken on a PSAM's word unless its MAC verifies: a verdict
// or reversal whose MAC does not leaves the purchase in doubt. Every move is
// made from the state the ruling read under the transaction's lock: should
// the lock have been lost meanwhile (its connection broke) and another
// replica have moved the purchase on, this ruling's write changes nothing.

import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { DebitVerdict, PsamJobStatus } from "../../gen/netpurse/terminal/v1/terminal.js";
import { SW } from "../../lib/apdu/apdu.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import type { Logger } from "../../lib/log.js";
import type { TransactionLocks } from "../../lib/store/locks.js";
import { DebitResponse, DebitResult, type DebitAnswer } from "../../lib/protocol/purse.js";
import { backgroundDeadline, describe, isAcceptedVerdict, PsamUnreachable, type PsamWork } from "./psam-work.js";
import { badCardSignature, cardDeclined, cardRefused, failureOf } from "./refusals.js";
import { answerColumns, failureColumns, type CardAnswer, type PaymentStore, type Purchase, type SignedPurchase, type Step } from "./store.js";

/** A purchase with a card answer recorded and not yet ruled on. */
export type Answered = Extract<Purchase, { state: "DEBIT_RESPONSE_RECEIVED" | "IN_DOUBT" }> & { answer: CardAnswer };

export class Ruling {
  constructor(
    private readonly o: {
      store: PaymentStore;
      work: PsamWork;
      log: Logger;
      /** The transactions' locks, shared with the RPC handlers and recovery (and, on PostgreSQL, with the other replicas). */
      locks: TransactionLocks;
    },
  ) {}

  /** Rules on the card answer recorded for a purchase (from CompletePurchase, or a proof that the card never debited). */
  async ruleStored(p: Answered, deadline: number): Promise<Purchase> {
    const a = p.answer;
    if (a.kind === "not_debited") return this.reverseAndFinish(p, this.neverDebited(p, a.proof), "reversed_never_debited", deadline);
    if (a.statusWord !== SW.OK) return this.reverseAndFinish(p, cardRefused(a.statusWord), "reversed_card_error", deadline);
    const answer = DebitResponse.decode(a.debitResponse);
    if (this.isExpectedDebit(p, answer)) return this.prove(p, answer, "card_signature_matched", "the card's signature is the one the PSAM expected");
    // The PSAM rules: its own mode, or an answer that is not the expected debit (a decline, a bad signature).
    return this.verifyInPsam(p, answer, a.debitResponse, { reported: undefined, deadline });
  }

  /**
   * Rules on an answer reported after the fact (ReportCardSignature, or the
   * card's log at its next contact). A report proves itself or is refused;
   * it never reverses anything.
   */
  async ruleReported(p: Purchase, answer: DebitAnswer, raw: Buffer, source: string, deadline: number): Promise<Purchase> {
    const recorded = "answer" in p ? p.answer : null;
    if (recorded) {
      if (recorded.kind === "card" && recorded.statusWord === SW.OK && recorded.debitResponse.equals(raw)) return p; // a repeat: counted once
      throw new NetpurseError(
        Status.ALREADY_EXISTS,
        ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
        `another card answer was already recorded for transaction ${p.transaction_id}`,
      );
    }
    if (p.state !== "DEBIT_COMMAND_ISSUED" && p.state !== "IN_DOUBT") {
      throw new NetpurseError(
        Status.FAILED_PRECONDITION,
        ErrorReason.ERROR_REASON_WRONG_STATE,
        `transaction ${p.transaction_id} is ${p.state}: no card answer is awaited`,
      );
    }
    if (p.expected_card_signature) {
      if (!this.isExpectedDebit(p, answer)) {
        await this.o.store.log(p.transaction_id, { step: "report_refused", detail: `${source}: not the card signature the PSAM expected` });
        throw badCardSignature("it is not the signature the PSAM expected for this transaction");
      }
      return this.prove(p, answer, "card_signature_reported", `${source}: the card's signature is the one the PSAM expected`, raw);
    }
    return this.verifyInPsam(p, answer, raw, { reported: source, deadline });
  }

  /**
   * FIG. 6-8: a card answer, just come, that is the debit the PSAM
   * predicted is recorded and proven in one commit (`recorded` is the
   * answer's event); undefined for any other answer, to be recorded first.
   */
  async proveOnArrival(p: SignedPurchase, a: CardAnswer, recorded: Step): Promise<Purchase | undefined> {
    if (a.kind !== "card" || a.statusWord !== SW.OK || !p.expected_card_signature) return undefined;
    const answer = DebitResponse.decode(a.debitResponse);
    if (!this.isExpectedDebit(p, answer)) return undefined;
    return this.prove(p, answer, "card_signature_matched", "the card's signature is the one the PSAM expected", a.debitResponse, [recorded]);
  }

  /**
   * The answer the PSAM predicted: its signature, and the counter and
   * balance that signature covers (a client keeping the signature and
   * changing the balance it reports must not have that balance recorded).
   * Anything else goes to the PSAM, which checks the signature over what
   * the answer says.
   */
  private isExpectedDebit(p: SignedPurchase, a: DebitAnswer): boolean {
    return (
      !!p.expected_card_signature &&
      a.result === DebitResult.DEBITED &&
      a.counter === p.card_counter + 1 &&
      p.card_balance !== null &&
      a.balance === p.card_balance - p.amount_minor &&
      macEqual(a.cardSignature, p.expected_card_signature)
    );
  }

  /** The card proved the debit: paid. Its proof goes into the PSAM's batch next. */
  private async prove(p: SignedPurchase, a: DebitAnswer, step: string, detail: string, raw?: Buffer, before: Step[] = []): Promise<Purchase> {
    const proven =
      (await this.o.store.transition(
        p.transaction_id,
        [p.state],
        { state: "PROVEN", new_balance: a.balance, ...(raw ? answerColumns({ kind: "card", statusWord: SW.OK, debitResponse: raw }) : {}) },
        [...before, { step, detail: `${detail}; card balance now ${a.balance}` }],
      )) ?? (await this.o.store.require(p.transaction_id));
    this.afterProof(proven);
    this.o.locks
      .run(p.transaction_id, { deadline: backgroundDeadline() }, () => this.recordProof(p.transaction_id))
      .catch((e: unknown) => this.o.log.warn("proof not recorded yet", { transaction: p.transaction_id, error: (e as Error).message }));
    return proven;
  }

  /** PROVEN → COMPLETED: the PSAM records the card's proof in its batch. Retried by the sweep until it lands. */
  async recordProof(transactionId: string): Promise<Purchase> {
    const p = await this.o.store.require(transactionId);
    if (p.state !== "PROVEN") return p;
    const done = await this.o.work.onSigningPsam(p, backgroundDeadline(), (lease) =>
      this.o.work.verifyDebit(lease, p, p.answer.debitResponse, backgroundDeadline()),
    );
    if (done instanceof PsamUnreachable) return p;
    if (done.status === PsamJobStatus.PSAM_JOB_STATUS_OK && done.outcome?.$case === "debitVerified" && isAcceptedVerdict(done.outcome.value.verdict)) {
      // Not recorded on a verdict that is not the PSAM's: the proof stays PROVEN, and the sweep asks again.
      if ((await this.o.work.checkVerdict(p, DebitResponse.decode(p.answer.debitResponse), done.outcome.value)) !== true) return p;
      const authenticated = done.outcome.value.verdict === DebitVerdict.DEBIT_VERDICT_AUTHENTICATED;
      await this.o.store.transition(
        transactionId,
        ["PROVEN"],
        { state: "COMPLETED" },
        authenticated
          ? { step: "authenticated", detail: `PSAM ${p.psam_id} verified the card's proof of presence: authenticated, nothing in a batch` }
          : { step: "recorded_in_batch", detail: `PSAM ${p.psam_id} recorded the card's proof in batch ${done.outcome.value.batchNumber}` },
      );
    } else {
      // The PSAM disagrees with a signature it predicted itself: an operator must look.
      this.o.log.error("PSAM did not record a proven debit", { transaction: transactionId, result: describe(done) });
      await this.o.store.log(transactionId, { step: "proof_not_recorded", detail: describe(done) });
    }
    return this.o.store.require(transactionId);
  }

  /**
   * The PSAM that signed the DEBIT command verifies the card's answer. A
   * `reported` answer (its source named) is recorded only if it verifies and
   * is never reversed; an answer given to CompletePurchase that does not
   * verify is reversed in the PSAM.
   */
  private async verifyInPsam(p: SignedPurchase, answer: DebitAnswer, raw: Buffer, o: { reported: string | undefined; deadline: number }): Promise<Purchase> {
    const outcome = await this.o.work.onSigningPsam(p, o.deadline, async (lease) => {
      const r = await this.o.work.verifyDebit(lease, p, raw, o.deadline);
      const badSignature = r.status === PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED && r.statusWord === SW.SECURITY_STATUS_NOT_SATISFIED;
      const reversed = badSignature && o.reported === undefined ? await this.o.work.reverse(lease, p, p.psam_counter, o.deadline) : undefined;
      return { r, badSignature, reversed };
    });
    const recorded = o.reported !== undefined ? answerColumns({ kind: "card", statusWord: SW.OK, debitResponse: raw }) : {};
    const prefix = o.reported !== undefined ? `${o.reported}: ` : "";
    if (outcome instanceof PsamUnreachable) {
      if (o.reported !== undefined) throw this.notNow(`cannot verify the reported answer now: ${outcome.why}`);
      return this.inDoubt(p, outcome.why);
    }
    const { r, badSignature, reversed } = outcome;
    if (r.status === PsamJobStatus.PSAM_JOB_STATUS_OK && r.outcome?.$case === "debitVerified") {
      // Neither completed nor reversed on a verdict that is not the PSAM's.
      const checked = await this.o.work.checkVerdict(p, answer, r.outcome.value);
      if (checked !== true) {
        if (o.reported !== undefined) throw this.notNow(checked.why);
        return this.inDoubt(p, checked.why);
      }
      if (isAcceptedVerdict(r.outcome.value.verdict)) {
        // An authentication ends COMPLETED like a recorded debit: the card proved its presence, and no batch holds it.
        const step =
          r.outcome.value.verdict === DebitVerdict.DEBIT_VERDICT_AUTHENTICATED
            ? { step: "authenticated", detail: `${prefix}PSAM ${p.psam_id} verified the card signature: the card was present; nothing in a batch` }
            : {
                step: "purchase_confirmed",
                detail: `${prefix}PSAM ${p.psam_id} verified the card signature and recorded the debit; card balance now ${answer.balance}`,
              };
        const done =
          (await this.o.store.transition(p.transaction_id, [p.state], { state: "COMPLETED", new_balance: answer.balance, ...recorded }, step)) ??
          (await this.o.store.require(p.transaction_id));
        this.afterProof(done);
        return done;
      }
      const e = cardDeclined(answer.result); // the result the verdict's MAC binds
      await this.finish(p, e, "declined_by_card", recorded);
      const declined = await this.o.store.require(p.transaction_id);
      this.afterProof(declined);
      if (o.reported !== undefined) return declined; // a reported decline is acknowledged: it is the card's truth
      throw e;
    }
    if (badSignature) {
      if (o.reported !== undefined) throw badCardSignature("the PSAM that signed the DEBIT command rejects it");
      if (reversed !== true) return this.inDoubt(p, reversed?.why ?? "the reversal was not tried");
      const e = badCardSignature("the PSAM rejects it; the transaction was reversed in the PSAM");
      await this.finish(p, e, "reversed_bad_card_signature");
      throw e;
    }
    if (o.reported !== undefined) throw this.notNow(`the PSAM could not rule now (${describe(r)})`);
    return this.inDoubt(p, `the PSAM could not rule: ${describe(r)}`);
  }

  private notNow(why: string): NetpurseError {
    return new NetpurseError(Status.UNAVAILABLE, ErrorReason.ERROR_REASON_IN_DOUBT, `${why}; report it again later`);
  }

  private async reverseAndFinish(p: SignedPurchase, e: NetpurseError, step: string, deadline: number): Promise<never> {
    const reversed = await this.o.work.onSigningPsam(p, deadline, (lease) => this.o.work.reverse(lease, p, p.psam_counter, deadline));
    if (reversed !== true) return this.inDoubt(p, reversed.why);
    await this.finish(p, e, step);
    throw e;
  }

  private neverDebited(p: SignedPurchase, proof: string): NetpurseError {
    return new NetpurseError(
      Status.FAILED_PRECONDITION,
      ErrorReason.ERROR_REASON_CARD_REFUSED,
      `the card never made this debit at its counter ${p.card_counter} (${proof}); the debit was reversed in the PSAM`,
    );
  }

  private async finish(p: SignedPurchase, e: NetpurseError, step: string, extra: ReturnType<typeof answerColumns> | object = {}): Promise<void> {
    await this.o.store.transition(p.transaction_id, [p.state], { state: "REVERSED", ...failureColumns(failureOf(e)), ...extra }, { step, detail: e.details });
  }

  private async inDoubt(p: SignedPurchase, why: string): Promise<never> {
    await this.o.store.transition(p.transaction_id, [p.state], { state: "IN_DOUBT" }, { step: "in_doubt", detail: why });
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
  afterProof(proven: Purchase): void {
    this.settleSameCounter(proven).catch((e: unknown) =>
      this.o.log.error("could not settle purchases the card proved it never made", { error: (e as Error).message }),
    );
  }

  private async settleSameCounter(proven: Purchase): Promise<void> {
    for (const listed of await this.o.store.sameCardCounter(proven.purse_id, proven.card_counter, proven.transaction_id)) {
      if ("answer" in listed && listed.answer) continue;
      await this.o.locks.run(listed.transaction_id, { deadline: backgroundDeadline() }, async () => {
        // Decided from the row read under the lock: another holder may have settled it since the listing.
        const other = await this.o.store.require(listed.transaction_id);
        if (other.state !== "DEBIT_COMMAND_ISSUED" && (other.state !== "IN_DOUBT" || other.answer)) return;
        const moved = await this.o.store.transition(
          other.transaction_id,
          [other.state],
          {
            state: "DEBIT_RESPONSE_RECEIVED",
            ...answerColumns({
              kind: "not_debited",
              proof: `card counter ${proven.card_counter} went to transaction ${proven.transaction_id}, proven by the card`,
            }),
          },
          { step: "proven_not_debited", detail: `card counter ${proven.card_counter} went to transaction ${proven.transaction_id}, proven by the card` },
        );
        if (!moved) return;
        const p = await this.o.store.require(other.transaction_id);
        if (p.state === "DEBIT_RESPONSE_RECEIVED") await this.ruleStored(p, backgroundDeadline()).catch(() => undefined);
      });
    }
  }
}

// Steps 684-694: a PSAM from the pool signs the DEBIT command for a draw
// request. A PSAM that cannot take the job (gone, failing, busy, full) is
// replaced by another, since no DEBIT command has left this server; a PSAM
// that refuses the card ends the purchase with the PSAM's reason. A DEBIT
// command whose PSAM MAC does not verify is never recorded nor sent: its
// PSAM leaves the pool and another PSAM is asked.

import { Status } from "nice-grpc";
import { ConfirmationMode, ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { PsamJobStatus } from "../../gen/netpurse/terminal/v1/terminal.js";
import { SW } from "../../lib/apdu/apdu.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import type { Logger } from "../../lib/log.js";
import type { HeldLock } from "../../lib/store/locks.js";
import { NoPsamFits, NoPsamFree, type Lease, type PsamPool } from "./psam-pool.js";
import { backgroundDeadline, MIN_JOB_MS, orphanReversed, type PsamWork } from "./psam-work.js";
import { errorOf, failureOf, psamRefusal } from "./refusals.js";
import { failureColumns, type PaymentStore, type Purchase, type SignedPurchase, type Step } from "./store.js";

/** Attempts on different PSAMs before the draw request is given up for now. */
const MAX_ATTEMPTS = 3;

/** Job results after which a PSAM leaves the pool until its terminal announces it again. */
const GONE = [PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, PsamJobStatus.PSAM_JOB_STATUS_TERMINAL_LOST, PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM];

export class DebitCommands {
  constructor(private readonly o: { store: PaymentStore; pool: PsamPool; work: PsamWork; log: Logger }) {}

  /**
   * Has a PSAM sign the purchase's DEBIT command; the purchase comes back
   * DEBIT_COMMAND_ISSUED, or an error says why not. Run under the
   * transaction's lock (`held`), which it lets go while it waits for a free
   * PSAM: a wait holds no lock connection, and another replica may take the
   * purchase on meanwhile (the client's retry there), so the row is read
   * again once the PSAM is had. When the purchase moved on without this
   * server's DEBIT command (its lock was lost meanwhile), the caller gets
   * what the record says (the ending, or the command another replica
   * recorded), never the command its PSAM signed, whose debit is reversed.
   */
  async issue(
    p: Extract<Purchase, { state: "RECEIVED" }>,
    card: { atr: Buffer; initializeResponse: Buffer },
    deadline: number,
    held?: HeldLock,
  ): Promise<SignedPurchase> {
    const psamVerifies = p.confirmation_mode === ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES;
    const tried = new Set<string>();
    for (let attempt = 1; attempt <= MAX_ATTEMPTS; attempt++) {
      if (deadline - Date.now() < MIN_JOB_MS) {
        await this.o.store.log(p.transaction_id, { step: "deadline_too_close", detail: `less than ${MIN_JOB_MS} ms left before the caller's deadline` });
        throw new NetpurseError(
          Status.DEADLINE_EXCEEDED,
          ErrorReason.ERROR_REASON_UNSPECIFIED,
          `too little time left before the deadline to ask a PSAM (attempt ${attempt}); nothing was signed, retry with a longer deadline`,
        );
      }
      // After a PSAM was lost, wait for another even in an empty pool: its terminal host usually comes back at once.
      const taken = await this.takePsam(p, tried, deadline, attempt > 1, held);
      const lease = taken.lease;
      tried.add(lease.key);
      if (taken.waited) {
        const now = await this.o.store.require(p.transaction_id).catch((e: unknown) => {
          this.o.pool.release(lease);
          throw e;
        });
        if (now.state !== "RECEIVED") {
          this.o.pool.release(lease);
          return this.recorded(now);
        }
      }
      // Given back on every way out but the hold for the card's answer (a release of a lease given back already does nothing).
      let kept = false;
      try {
        // Recorded with the attempt's outcome, in the same commit: no commit of its own inside the PSAM's hold. Should this
        // server stop before that, the PSAM reports the open debit it signed when its terminal attaches, and it is reversed.
        const assigned: Step = { step: "psam_assigned", detail: `terminal ${lease.terminalId} PSAM ${lease.psamId} (attempt ${attempt})` };
        const result = await this.o.work.issueDebitCommand(lease, p, card, !psamVerifies, deadline);
        if (result.status === PsamJobStatus.PSAM_JOB_STATUS_OK && result.outcome?.$case === "debitCommandIssued") {
          const issued = result.outcome.value;
          if ((await this.o.work.checkIssued(lease, p, issued, !psamVerifies)) !== true) {
            // Not the PSAM's word: whoever answered for it is not trusted with another job until its terminal announces it again.
            this.o.pool.markFailed(lease);
            this.o.pool.release(lease);
            await this.o.store.log(p.transaction_id, assigned);
            continue;
          }
          // FIG. 6-8 need the PSAM no more: it goes back to the pool before the record is written (its own state, with the
          // open debit, is durable in the PSAM already), and its hold is logged with the record. FIG. 5 holds it for the card's answer.
          const released = psamVerifies ? undefined : this.o.work.release(lease, "the DEBIT command came with the expected card signature");
          const moved = await this.o.store.transition(
            p.transaction_id,
            ["RECEIVED"],
            {
              state: "DEBIT_COMMAND_ISSUED",
              terminal_id: lease.terminalId,
              psam_id: lease.psamId,
              psam_counter: issued.psamCounter,
              debit_command: Buffer.from(issued.debitCommand),
              expected_card_signature: psamVerifies ? null : Buffer.from(issued.expectedCardSignature),
            },
            [
              assigned,
              {
                step: "debit_command_issued",
                detail: `PSAM ${lease.psamId} counter ${issued.psamCounter} signed the DEBIT command${psamVerifies ? "" : " and gave the card signature it expects"}`,
              },
              ...(released ? [released] : []),
            ],
          );
          if (!moved) {
            // The purchase moved on without this command: this server's lock was lost meanwhile (its connection cut) and another
            // replica ended the purchase, or recorded its own command. This one never leaves; its debit is reversed.
            const now = await this.o.store.require(p.transaction_id);
            kept = true; // the reversal gives the lease back
            this.reverseUnsent(now, lease, issued.psamCounter, !released);
            return this.recorded(now);
          }
          if (psamVerifies) {
            this.o.work.hold(p.transaction_id, lease);
            kept = true;
          }
          if (!("psam_id" in moved)) throw new Error(`transaction ${p.transaction_id} lost its DEBIT command`);
          return moved;
        }
        const full = result.statusWord === SW.BATCH_FULL || result.statusWord === SW.TOO_MANY_OPEN_DEBITS;
        if (result.status === PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED && !full) {
          this.o.pool.release(lease);
          return this.refuse(p, psamRefusal(result.statusWord), assigned);
        }
        // No debit command left this server, so the work goes to another PSAM.
        this.o.log.warn("PSAM could not take the job; trying another", {
          transaction: p.transaction_id,
          psam: lease.psamId,
          status: PsamJobStatus[result.status],
          detail: result.message,
        });
        if (GONE.includes(result.status)) this.o.pool.markFailed(lease);
        this.o.pool.release(lease);
        await this.o.store.log(p.transaction_id, [assigned, { step: "psam_unavailable", detail: `${PsamJobStatus[result.status]}: ${result.message}` }]);
      } finally {
        if (!kept) this.o.pool.release(lease);
      }
    }
    throw new NetpurseError(
      Status.UNAVAILABLE,
      ErrorReason.ERROR_REASON_UNSPECIFIED,
      `no PSAM could take the transaction after ${MAX_ATTEMPTS} attempts; retry the same draw request later`,
    );
  }

  /** The answer a draw request gets from its record, once the purchase left RECEIVED without this call's DEBIT command. */
  private recorded(now: Purchase): SignedPurchase {
    if (now.state === "REFUSED" || now.state === "REVERSED") throw errorOf(now.failure);
    if ("psam_id" in now) return now;
    throw new NetpurseError(Status.ABORTED, ErrorReason.ERROR_REASON_WRONG_STATE, "the transaction changed state meanwhile; retry");
  }

  /**
   * Reverses, in the background, the open debit of a DEBIT command signed
   * for purchase `p` and never recorded (no record will ever point to it):
   * on the lease still held, or on the PSAM leased again. Should it fail,
   * the PSAM reports the debit when its terminal is announced next, and
   * reconcile reverses it.
   */
  private reverseUnsent(p: Purchase, lease: Lease, psamCounter: number, stillLeased: boolean): void {
    const reverse = async () => {
      const l = stillLeased ? lease : await this.o.work.leaseSigningPsam(lease.terminalId, lease.psamId);
      if (!l) return;
      try {
        // Logged once, whoever reverses it first (reconcile, at any replica the PSAM reports its open debit to, does too).
        if ((await this.o.work.reverse(l, p, psamCounter, backgroundDeadline())) === true)
          await this.o.store.logOnce(p.transaction_id, orphanReversed(lease.psamId, psamCounter));
      } finally {
        this.o.pool.release(l);
      }
    };
    reverse().catch((e: unknown) =>
      this.o.log.warn("an unsent DEBIT command's debit was not reversed now; reversed when its terminal is announced next", {
        transaction: p.transaction_id,
        psam: lease.psamId,
        error: (e as Error).message,
      }),
    );
  }

  /** Ends a purchase that never got a DEBIT command, with the error its caller (and any retry) gets. */
  async refuse(p: Purchase, e: NetpurseError, before?: Step): Promise<never> {
    await this.o.store.transition(p.transaction_id, ["RECEIVED"], { state: "REFUSED", ...failureColumns(failureOf(e)) }, [
      ...(before ? [before] : []),
      { step: "refused", detail: e.details },
    ]);
    throw e;
  }

  /**
   * A PSAM for the attempt: one free now, else one that comes free by the
   * deadline, waited for with the transaction's lock let go (`waited`: the
   * purchase must be read again).
   */
  private async takePsam(
    p: Purchase,
    tried: Set<string>,
    deadline: number,
    waitWhenEmpty: boolean,
    held?: HeldLock,
  ): Promise<{ lease: Lease; waited: boolean }> {
    const want = { currency: p.currency, keyVersion: p.key_version, exclude: tried, waitWhenEmpty };
    try {
      if (!held) return { lease: await this.o.pool.acquire(want, deadline), waited: false };
      try {
        return { lease: await this.o.pool.acquire(want, 0), waited: false };
      } catch (e) {
        if (!(e instanceof NoPsamFree)) throw e;
      }
      const lease = await held.without(
        () => this.o.pool.acquire(want, deadline),
        (l) => this.o.pool.release(l),
      );
      return { lease, waited: true };
    } catch (e) {
      if (e instanceof NoPsamFits) {
        // Not stored as a refusal: it depends on the pool as it is now, and a retry may find a PSAM.
        const reason = {
          none: ErrorReason.ERROR_REASON_NO_PSAM_ATTACHED,
          currency: ErrorReason.ERROR_REASON_CURRENCY_MISMATCH,
          keyVersion: ErrorReason.ERROR_REASON_KEY_VERSION_UNKNOWN,
        }[e.what];
        const retry = e.what === "none" ? "; retry the same draw request once a terminal host is attached" : "";
        await this.o.store.log(p.transaction_id, { step: "no_psam_fits", detail: e.message });
        throw new NetpurseError(Status.FAILED_PRECONDITION, reason, `${e.message}; nothing was debited${retry}`);
      }
      if (!(e instanceof NoPsamFree)) throw e;
      await this.o.store.log(p.transaction_id, { step: "no_psam_free", detail: e.message });
      throw new NetpurseError(
        Status.RESOURCE_EXHAUSTED,
        ErrorReason.ERROR_REASON_NO_PSAM_FREE,
        `no PSAM for this transaction now: ${e.message}; retry the same draw request later`,
      );
    }
  }
}

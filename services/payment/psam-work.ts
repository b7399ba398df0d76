// PSAM jobs for purchases, built in one place: the DEBIT command for a draw
// request, the verdict on the card's answer, the reversal of a debit; and
// the checks of the PSAM's MAC over each answer, through the payment
// operator's security module, so that no answer a terminal host or the
// concentrator made up is acted on. It also takes the PSAM that signed a
// purchase's DEBIT command (held since the draw request, or leased again),
// runs a job on it within the caller's time, and holds or releases it as
// the mode allows. Among replicas, the card's answer may reach another
// replica than the one holding the PSAM: the holder watches its holds and
// hands over any that another replica needs (watchHolds).

import type { Money } from "../../gen/netpurse/card/v1/card.js";
import {
  DebitVerdict,
  PsamJobStatus,
  type DebitCommandIssued,
  type DebitVerified,
  type PsamJob,
  type PsamJobResult,
} from "../../gen/netpurse/terminal/v1/terminal.js";
import { SW, swHex } from "../../lib/apdu/apdu.js";
import { merchantId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { money } from "../../lib/money.js";
import type { TransactionLocks } from "../../lib/store/locks.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import { Verdict } from "../../lib/protocol/psam.js";
import { DebitCommand, type DebitAnswer } from "../../lib/protocol/purse.js";
import type { ConcentratorLink } from "./concentrator-link.js";
import { NoPsamFree, psamKey, type Lease, type PsamPool } from "./psam-pool.js";
import type { PsamVerdictChecker } from "./security-module.js";
import type { PaymentStore, Purchase, SignedPurchase, Step } from "./store.js";

/** The least time worth giving a terminal for one job; with less left, no job is sent. */
export const MIN_JOB_MS = 1_000;

/** The time a step no caller waits for (recovery, the sweep, recording a proof) gives its PSAM job. */
const BACKGROUND_JOB_MS = 10_000;

/** How soon a job the concentrator refused because another stream leases the PSAM is sent again. */
const SLOT_BUSY_AGAIN_MS = 50;

/** The longest a step waits for the particular PSAM that signed a purchase to come free. */
const SIGNING_PSAM_WAIT_MS = 5_000;

/** The deadline of a step no caller waits for. */
export const backgroundDeadline = () => Date.now() + BACKGROUND_JOB_MS;

/**
 * The event of an open debit reversed in its PSAM whose DEBIT command never
 * left (never recorded, or recorded for another PSAM): the same words
 * whoever reverses it, so that it is logged once (PaymentStore.logOnce).
 */
export const orphanReversed = (psamId: string, psamCounter: number): Step => ({
  step: "orphan_debit_reversed",
  detail: `PSAM ${psamId} counter ${psamCounter}: its DEBIT command never left this server`,
});

/** The pool's key of the PSAM that signed a purchase's DEBIT command. */
export const psamKeyOf = (p: SignedPurchase) => psamKey(p.terminal_id, p.psam_id);

/** A PSAM that could not be reached, and why. */
export class PsamUnreachable {
  constructor(readonly why: string) {}
}

/** An answer whose PSAM MAC does not verify: not the PSAM's word, whoever sent it. Logged when made. */
export class VerdictRefused {
  constructor(readonly why: string) {}
}

/** The verdict byte the PSAM's MAC binds, by the verdict the terminal host reports. */
const VERDICT_BYTE: Partial<Record<DebitVerdict, number>> = {
  [DebitVerdict.DEBIT_VERDICT_RECORDED]: Verdict.RECORDED,
  [DebitVerdict.DEBIT_VERDICT_DECLINED_BY_CARD]: Verdict.DECLINED_BY_CARD,
  [DebitVerdict.DEBIT_VERDICT_AUTHENTICATED]: Verdict.AUTHENTICATED,
};

/** Whether a verdict says the card's proof was accepted: recorded in the batch (money, points) or authenticated (currency 999). */
export const isAcceptedVerdict = (v: DebitVerdict) => v === DebitVerdict.DEBIT_VERDICT_RECORDED || v === DebitVerdict.DEBIT_VERDICT_AUTHENTICATED;

/** The card's result code and signature, the part of its answer a verdict MAC binds. */
type RuledAnswer = Pick<DebitAnswer, "result" | "cardSignature">;

export class PsamWork {
  /** PSAMs held across the cardholder's round trip (PSAM_VERIFIES). */
  private readonly holds = new Map<string, { lease: Lease; timer: NodeJS.Timeout }>();
  /** The watch of the holds, running while there is any (watchHolds). */
  private watching: NodeJS.Timeout | undefined;
  private looking = false;

  constructor(
    readonly o: {
      pool: PsamPool;
      link: ConcentratorLink;
      store: PaymentStore;
      log: Logger;
      /** The payment operator's security module: checks the PSAMs' MACs. */
      verdicts: PsamVerdictChecker;
      holdTimeoutMs: number;
      jobTimeoutMs: number;
      /**
       * Replicas on one database: every `everyMs` while this server holds
       * any PSAM, it looks whether another replica moved a held purchase on
       * or holds its lock (it took the card's answer, and waits for the
       * PSAM), and gives that PSAM back at once (watchHolds).
       */
      watchHolds?: { locks: TransactionLocks; everyMs: number };
    },
  ) {}

  private jobTimeout(deadline: number): number {
    return Math.max(MIN_JOB_MS, Math.min(this.o.jobTimeoutMs, deadline - Date.now()));
  }

  private async run(lease: Lease, transactionId: string, task: PsamJob["task"], deadline: number): Promise<PsamJobResult> {
    for (;;) {
      const r = await this.o.link.runJob(lease, { transactionId: txnId(transactionId), task }, this.jobTimeout(deadline));
      // The concentrator did nothing: the PSAM is leased to another stream (a replica of ours took it the moment it came
      // free, for another purchase). Asked again while there is time, it is ours once that job is done.
      if (r.status !== PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY || deadline - Date.now() < MIN_JOB_MS + SLOT_BUSY_AGAIN_MS) return r;
      await new Promise((resolve) => setTimeout(resolve, SLOT_BUSY_AGAIN_MS));
    }
  }

  /** Steps 684-690: the PSAM replays the card's answers and signs the DEBIT command (and predicts the card's signature when asked). */
  issueDebitCommand(
    lease: Lease,
    p: Purchase,
    card: { atr: Buffer; initializeResponse: Buffer },
    returnExpectedSignature: boolean,
    deadline: number,
  ): Promise<PsamJobResult> {
    const amount: Money = money(p.amount_minor, p.currency, p.exponent);
    return this.run(
      lease,
      p.transaction_id,
      {
        $case: "issueDebitCommand",
        value: { cardAtr: card.atr, initializeResponse: card.initializeResponse, amount, merchantId: merchantId(p.merchant_id), returnExpectedSignature },
      },
      deadline,
    );
  }

  /** The PSAM verifies the card's answer to its DEBIT command and, when it is the debit, records it in its batch. */
  verifyDebit(lease: Lease, p: SignedPurchase, debitResponse: Buffer, deadline: number): Promise<PsamJobResult> {
    return this.run(lease, p.transaction_id, { $case: "verifyDebit", value: { psamCounter: p.psam_counter, cardStatusWord: SW.OK, debitResponse } }, deadline);
  }

  /**
   * REVERSE DEBIT of the leased PSAM's open debit at `psamCounter`, made for
   * purchase `p`: true once the PSAM confirms with its MAC over the reversal,
   * or why not. A reversal whose MAC does not verify is not a reversal.
   */
  async reverse(lease: Lease, p: Purchase, psamCounter: number, deadline: number): Promise<true | PsamUnreachable | VerdictRefused> {
    const r = await this.run(lease, p.transaction_id, { $case: "reverseDebit", value: { psamCounter } }, Math.max(deadline, Date.now() + MIN_JOB_MS));
    if (r.status !== PsamJobStatus.PSAM_JOB_STATUS_OK) return new PsamUnreachable(`reversal not confirmed by the PSAM: ${describe(r)}`);
    const mac = r.outcome?.$case === "debitReversed" ? r.outcome.value.reversalMac : new Uint8Array();
    const ok = this.o.verdicts.reversed(lease.psamId, { psamCounter, transactionRef: p.transaction_id, amount: p.amount_minor, currency: p.currency }, mac);
    if (ok) return true;
    return this.refused(p.transaction_id, lease.psamId, `reversal of PSAM ${lease.psamId} counter ${psamCounter}`);
  }

  /**
   * Checks the PSAM's MAC over a DEBIT command it issued for purchase `p`:
   * the command must be the one for this purchase (amount, currency,
   * transaction, the leased PSAM and the counter it reports), made for the
   * card session of the draw request, with the expected card signature when
   * it was asked for. A refusal is logged (an error, and the purchase's event).
   */
  async checkIssued(lease: Lease, p: Purchase, issued: DebitCommandIssued, withExpectedSignature: boolean): Promise<true | VerdictRefused> {
    const what = `DEBIT command of PSAM ${lease.psamId} counter ${issued.psamCounter}`;
    let command;
    try {
      command = DebitCommand.decode(issued.debitCommand);
    } catch (e) {
      if (!(e instanceof LayoutError)) throw e;
      return this.refused(p.transaction_id, lease.psamId, `${what}: ${e.message}`);
    }
    const fields = {
      amount: p.amount_minor,
      currency: p.currency,
      psamId: Buffer.from(lease.psamId, "hex"),
      psamCounter: issued.psamCounter,
      dateTime: command.dateTime,
      transactionRef: p.transaction_id,
      psamSignature: command.psamSignature,
    };
    let ours: Buffer;
    try {
      ours = DebitCommand.encode(fields);
    } catch (e) {
      if (!(e instanceof LayoutError)) throw e;
      return this.refused(p.transaction_id, lease.psamId, `${what}: ${e.message}`);
    }
    if (!ours.equals(Buffer.from(issued.debitCommand))) {
      return this.refused(p.transaction_id, lease.psamId, `${what}: not the command for this purchase's amount, transaction, PSAM and counter`);
    }
    const ok = this.o.verdicts.issued(
      lease.psamId,
      {
        psamCounter: issued.psamCounter,
        transactionRef: p.transaction_id,
        amount: p.amount_minor,
        currency: p.currency,
        exponent: p.exponent,
        purseId: Buffer.from(p.purse_id, "hex"),
        cardCounter: p.card_counter,
        dateTime: command.dateTime,
        psamSignature: command.psamSignature,
        expectedCardSignature: withExpectedSignature ? Buffer.from(issued.expectedCardSignature) : Buffer.alloc(8),
      },
      issued.issuedMac,
    );
    if (ok) return true;
    return this.refused(p.transaction_id, lease.psamId, what);
  }

  /**
   * Checks the PSAM's MAC over its verdict on the card's answer `answer` to
   * the purchase's DEBIT command. A refusal is logged (an error, and the
   * purchase's event).
   */
  async checkVerdict(p: SignedPurchase, answer: RuledAnswer, v: DebitVerified): Promise<true | VerdictRefused> {
    // The security module refuses a verdict of the wrong kind for the debit's currency (AUTHENTICATED is for 999 only).
    const verdict = VERDICT_BYTE[v.verdict];
    const what = `verdict ${DebitVerdict[v.verdict] ?? v.verdict} of PSAM ${p.psam_id} counter ${p.psam_counter}`;
    if (verdict === undefined) return this.refused(p.transaction_id, p.psam_id, `${what}: no such verdict`);
    const ok = this.o.verdicts.verdict(
      p.psam_id,
      {
        psamCounter: p.psam_counter,
        transactionRef: p.transaction_id,
        amount: p.amount_minor,
        currency: p.currency,
        verdict,
        cardResult: answer.result,
        batchNumber: v.batchNumber,
        cardSignature: answer.cardSignature,
      },
      v.verdictMac,
    );
    if (ok) return true;
    return this.refused(p.transaction_id, p.psam_id, what);
  }

  /** Logs an answer whose MAC does not verify, as an error and as the purchase's event. */
  private async refused(transactionId: string, psamId: string, what: string): Promise<VerdictRefused> {
    const why = `PSAM verdict does not verify: ${what}`;
    this.o.log.error("PSAM verdict does not verify: not acted on", { transaction: transactionId, psam: psamId, answer: what });
    await this.o.store.log(transactionId, { step: "psam_verdict_refused", detail: why });
    return new VerdictRefused(why);
  }

  /** Keeps the PSAM for the cardholder's answer, but not forever. */
  hold(transactionId: string, lease: Lease): void {
    const timer = setTimeout(() => this.handOver(transactionId, lease, "no card answer in time; its debit stays open"), this.o.holdTimeoutMs);
    timer.unref();
    this.holds.set(transactionId, { lease, timer });
    this.watch();
  }

  /** Gives a held PSAM back, if that hold is still the transaction's; its debit stays open in the PSAM, ruled on by whoever leases it next. */
  private handOver(transactionId: string, lease: Lease, why: string): void {
    if (this.holds.get(transactionId)?.lease !== lease) return;
    this.takeHold(transactionId);
    this.giveBack(transactionId, lease, why).catch((e: unknown) =>
      this.o.log.error("could not give a held PSAM back", { transaction: transactionId, psam: lease.psamId, error: (e as Error).message }),
    );
  }

  /** Starts the watch of the holds, if replicas share the database and it is not running. */
  private watch(): void {
    const w = this.o.watchHolds;
    if (!w || this.watching) return;
    this.watching = setInterval(() => {
      if (this.holds.size === 0) {
        clearInterval(this.watching);
        this.watching = undefined;
        return;
      }
      if (this.looking) return;
      this.looking = true;
      this.lookAtHolds(w.locks)
        .catch((e: unknown) => this.o.log.warn("could not look at the held PSAMs' purchases", { error: (e as Error).message }))
        .finally(() => (this.looking = false));
    }, w.everyMs);
    this.watching.unref();
  }

  /**
   * The card's answer reached another replica: it moved the purchase on
   * (recorded the answer), or holds its lock (it works on it, and may wait
   * for this PSAM). Either way this server's hold only keeps the PSAM from
   * it: the PSAM goes back to the pool, and to the concentrator, which
   * leases it to the replica asking for it. Holds whose transaction this
   * server works on itself (holding its lock) are left alone: it uses them.
   * One it merely waits for, another replica holds: that one may be
   * waiting for the PSAM, and gets it.
   */
  private async lookAtHolds(locks: TransactionLocks): Promise<void> {
    const held = new Map([...this.holds].filter(([id]) => !locks.heldHere(id)).map(([id, h]) => [id, h.lease]));
    if (held.size === 0) return;
    const ids = [...held.keys()];
    const [states, elsewhere] = await Promise.all([this.o.store.states(ids), locks.heldElsewhere(ids)]);
    for (const [id, lease] of held) {
      if (locks.heldHere(id)) continue; // taken up here meanwhile: this server uses its hold
      const state = states.get(id);
      if (state !== "DEBIT_COMMAND_ISSUED") this.handOver(id, lease, `another payment server took the purchase on (now ${state ?? "gone"})`);
      else if (elsewhere.has(id)) this.handOver(id, lease, "another payment server is working on the purchase");
    }
  }

  /**
   * Gives a purchase's PSAM back to the pool and logs how long the purchase
   * held it (from the lease to now). The PSAM is free whatever happens to the
   * log line, which is only a measurement: a failed write is reported, not thrown.
   */
  async giveBack(transactionId: string, lease: Lease, why: string): Promise<void> {
    const released = this.release(lease, why);
    try {
      await this.o.store.log(transactionId, released);
    } catch (e) {
      this.o.log.warn("PSAM released, but its release was not logged", { transaction: transactionId, psam: lease.psamId, error: (e as Error).message });
    }
  }

  /** Gives a PSAM back to the pool now; the step to log with the purchase's next write says how long it was held. */
  release(lease: Lease, why: string): Step {
    this.o.pool.release(lease);
    return { step: "psam_released", detail: `PSAM ${lease.psamId} held ${Date.now() - lease.takenAt} ms: ${why}` };
  }

  private takeHold(transactionId: string): Lease | undefined {
    const h = this.holds.get(transactionId);
    if (!h) return undefined;
    clearTimeout(h.timer);
    this.holds.delete(transactionId);
    return h.lease;
  }

  /**
   * Runs `fn` on the PSAM that signed the purchase's DEBIT command and gives
   * the PSAM back after; a PsamUnreachable when that PSAM is not in the pool
   * or does not become free in time.
   */
  async onSigningPsam<T>(p: SignedPurchase, deadline: number, fn: (lease: Lease) => Promise<T>): Promise<T | PsamUnreachable> {
    const held = this.takeHold(p.transaction_id);
    let lease = held;
    if (!lease) {
      const key = psamKeyOf(p);
      if (!this.o.pool.has(key)) return new PsamUnreachable(`PSAM ${p.psam_id} of terminal ${p.terminal_id} is not in the pool`);
      try {
        lease = await this.o.pool.acquire({ key }, Math.min(deadline, Date.now() + SIGNING_PSAM_WAIT_MS));
      } catch (e) {
        if (e instanceof NoPsamFree) return new PsamUnreachable(e.message);
        throw e;
      }
    }
    try {
      return await fn(lease);
    } finally {
      // The hold is logged with the ruling's record, in its commit (or alone, should none follow).
      if (held) this.o.store.later(p.transaction_id, this.release(lease, "the card's answer is ruled on"));
      else this.o.pool.release(lease);
    }
  }

  /** A lease of one particular PSAM, if it comes free soon (to reverse an open debit it reported). */
  leaseSigningPsam(terminalId: string, psamId: string): Promise<Lease | undefined> {
    return this.o.pool.acquire({ key: psamKey(terminalId, psamId) }, Date.now() + SIGNING_PSAM_WAIT_MS).catch(() => undefined);
  }

  releaseAll(): void {
    this.stopWatching();
    for (const id of [...this.holds.keys()]) {
      const l = this.takeHold(id);
      if (l) this.o.pool.release(l);
    }
  }

  /** Drops every hold and its timer without a word to anyone, as the process's death would (a test's crash). */
  forgetAll(): void {
    this.stopWatching();
    for (const id of [...this.holds.keys()]) this.takeHold(id);
  }

  private stopWatching(): void {
    clearInterval(this.watching);
    this.watching = undefined;
  }
}

export function describe(r: PsamJobResult): string {
  return `${PsamJobStatus[r.status]}${r.statusWord ? ` SW ${swHex(r.statusWord)}` : ""}${r.message ? ` ${r.message}` : ""}`;
}

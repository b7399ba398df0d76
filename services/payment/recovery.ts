// Recovery: purchases whose steps were cut short by a PSAM away, a terminal
// that dropped, a payment server restart or a card answer that never came.
// It settles what waited for a PSAM when that PSAM is back, records proven
// debits in their PSAM's batch, puts in doubt DEBIT commands whose proof did
// not come in time, settles purchases from the card's log at its next
// contact, reverses open debits in PSAMs whose DEBIT command never left
// this server, and ends draw requests that never got their DEBIT command
// (left by a previous run, or unfinished for too long). Nothing is guessed:
// each purchase the card may have paid is settled by a proof.
//
// Replicas sharing one PostgreSQL database all run it. Each acts on a
// purchase only holding its transaction's lock, taken with a try (one held
// elsewhere is being worked on: it is skipped, and looked at again at the
// next sweep), and decides from the row read under that lock: what a dead
// replica left is finished by one survivor, once.

import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import type { PsamSlot, TerminalInfo } from "../../gen/netpurse/terminal/v1/terminal.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import { hexOf } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { LockBusy, type TransactionLocks } from "../../lib/store/locks.js";
import { repeat, type Periodic } from "../../lib/periodic.js";
import { DebitResponse, DebitResult, type CardLogRecord } from "../../lib/protocol/purse.js";
import type { PsamPool } from "./psam-pool.js";
import { backgroundDeadline, orphanReversed, psamKeyOf, type PsamWork } from "./psam-work.js";
import { failureOf } from "./refusals.js";
import type { Ruling } from "./ruling.js";
import { failureColumns, type PaymentStore, type Purchase } from "./store.js";

/** How long the reversal of an open debit waits for its purchase's lock (another step of it under way) before it is left to the next announcement. */
const ORPHAN_LOCK_WAIT_MS = 30_000;

export class Recovery {
  private sweeping: Periodic | undefined;

  constructor(
    private readonly o: {
      store: PaymentStore;
      pool: PsamPool;
      work: PsamWork;
      ruling: Ruling;
      locks: TransactionLocks;
      log: Logger;
      /** How long a DEBIT command may wait for the card's proof before the purchase is in doubt. */
      proofTimeoutMs: number;
      /** How long a draw request may stay RECEIVED (no DEBIT command left) before it is ended. */
      abandonReceivedAfterMs: number;
    },
  ) {}

  /**
   * Every `everyMs` and once now: settles purchases whose card answer is
   * recorded but not ruled on, records proven ones in their PSAM's batch,
   * and puts in doubt DEBIT commands whose proof did not come in time.
   */
  startSweeping(everyMs: number): void {
    this.sweeping = repeat({ what: "sweep of waiting purchases", everyMs, log: this.o.log, task: () => this.sweep() });
  }

  stop(): void {
    this.sweeping?.stop();
  }

  async sweep(): Promise<void> {
    await this.abandonReceived(
      new Date(Date.now() - this.o.abandonReceivedAfterMs),
      `it was left unfinished for more than ${this.o.abandonReceivedAfterMs} ms`,
    );
    await this.o.store.dropExpiredDraws();
    const waiting = await this.o.store.inStates(["DEBIT_RESPONSE_RECEIVED", "IN_DOUBT", "PROVEN"]);
    await this.settleWaiting(waiting.filter((p) => "psam_id" in p && this.o.pool.has(psamKeyOf(p))));
    const before = new Date(Date.now() - this.o.proofTimeoutMs).toISOString();
    for (const { transaction_id: id } of await this.o.store.staleInStates(["DEBIT_COMMAND_ISSUED"], before)) {
      await this.o.locks.tryRun(id, async () => {
        const p = await this.o.store.get(id);
        if (p?.state !== "DEBIT_COMMAND_ISSUED" || p.updated_at >= before) return;
        await this.o.store.transition(
          id,
          ["DEBIT_COMMAND_ISSUED"],
          { state: "IN_DOUBT" },
          { step: "no_proof_in_time", detail: `no card answer within ${this.o.proofTimeoutMs} ms; settled from the card's proof at its next contact` },
        );
      });
    }
  }

  /**
   * Ends the draw requests a previous run of this server left RECEIVED (all
   * rows received before `startedAt`): no request of this process handles
   * them, and the process that did is gone. Run at start-up, before calls
   * are served. On a database replicas share, the others' rows are theirs:
   * a RECEIVED row may be a draw request another replica works on (waiting
   * for a PSAM, without its lock) or one it left for the client's retry, so
   * only rows older than `--abandon-received-after-ms` are ended, as the
   * sweep would; one whose lock another replica holds is left to it.
   */
  async abandonLeftByPreviousRun(startedAt: Date): Promise<void> {
    const before = this.o.locks.shared ? new Date(Math.min(startedAt.getTime(), Date.now() - this.o.abandonReceivedAfterMs)) : startedAt;
    await this.abandonReceived(before, "the payment server stopped before its DEBIT command left");
  }

  /**
   * Ends purchases still RECEIVED since before `before`: REFUSED, with the
   * answer the same draw request gets from now on. A RECEIVED purchase never
   * had its DEBIT command leave this server (the command is recorded
   * before it is sent), so no card was debited for it; an open debit its
   * PSAM may hold is an orphan, reversed when the terminal attaches
   * (reconcile: a REFUSED row is not the PSAM's live transaction). Under the
   * transaction's lock, taken only if free, so a draw request being handled
   * (here or in another replica) is never ended under its feet: it is looked
   * at again at the next sweep.
   */
  private async abandonReceived(before: Date, why: string): Promise<void> {
    for (const { transaction_id: id } of await this.o.store.staleInStates(["RECEIVED"], before.toISOString())) {
      await this.o.locks.tryRun(id, async () => {
        const p = await this.o.store.get(id);
        if (p?.state !== "RECEIVED" || p.updated_at >= before.toISOString()) return;
        const ended = await this.end(
          p,
          why,
          `${why}; no DEBIT command left this server, so no card was debited; an open debit its PSAM holds is reversed when its terminal attaches`,
        );
        if (ended) this.o.log.info("draw request without a DEBIT command ended", { transaction: id, why });
      });
    }
  }

  /** Ends a RECEIVED purchase (REFUSED, DRAW_REQUEST_ABANDONED), if it still is: the purchase as it now stands, or undefined. */
  private end(p: Purchase, why: string, detail: string): Promise<Purchase | undefined> {
    const e = new NetpurseError(
      Status.FAILED_PRECONDITION,
      ErrorReason.ERROR_REASON_DRAW_REQUEST_ABANDONED,
      `transaction ${p.transaction_id} was ended by the payment server: ${why}; nothing was debited: pay with a new offer`,
    );
    return this.o.store.transition(
      p.transaction_id,
      ["RECEIVED"],
      { state: "REFUSED", ...failureColumns(failureOf(e)) },
      { step: "draw_request_abandoned", detail },
    );
  }

  /**
   * Has each purchase's card answer ruled on, or its proof recorded; the
   * outcome lands in the record. One whose lock is held is being worked on
   * (here or in another replica) and is skipped.
   */
  private async settleWaiting(purchases: Purchase[]): Promise<void> {
    for (const { transaction_id: id } of purchases) {
      await this.o.locks.tryRun(id, async () => {
        const p = await this.o.store.require(id);
        if (p.state === "PROVEN") {
          await this.o.ruling.recordProof(id);
          return;
        }
        if ((p.state !== "DEBIT_RESPONSE_RECEIVED" && p.state !== "IN_DOUBT") || !p.answer) return;
        await this.o.ruling.ruleStored({ ...p, answer: p.answer }, backgroundDeadline()).then(
          () => this.o.log.info("waiting purchase settled", { transaction: id }),
          (e: unknown) => this.o.log.info("waiting purchase resolved", { transaction: id, outcome: e instanceof NetpurseError ? e.details : String(e) }),
        );
      });
    }
  }

  /**
   * The card's log came with its next draw request: purchases of this card
   * still waiting for its proof find it there (the debit with the card's
   * signature), and are settled without guessing. Runs in the background;
   * the promise (which never rejects) says when every entry was looked at,
   * for a caller that wants to count what is still open after.
   */
  settleFromCardLog(purse: string, log: CardLogRecord[]): Promise<void> {
    const each = log.map((entry) =>
      this.o.locks
        .run(entry.transactionRef, { deadline: backgroundDeadline() }, async () => {
          const p = await this.o.store.get(entry.transactionRef);
          if (!p || p.purse_id !== purse || (p.state !== "DEBIT_COMMAND_ISSUED" && p.state !== "IN_DOUBT")) return;
          if (p.state === "IN_DOUBT" && p.answer) return;
          if (p.psam_id !== entry.moduleId.toString("hex") || p.psam_counter !== entry.moduleCounter) return;
          const answer = { result: DebitResult.DEBITED, counter: entry.counter, balance: entry.balance, cardSignature: entry.cardSignature };
          await this.o.ruling.ruleReported(p, answer, DebitResponse.encode(answer), "from the card's log at its next contact", backgroundDeadline());
          this.o.log.info("purchase settled from the card's log", { transaction: p.transaction_id });
        })
        .catch((e: unknown) =>
          this.o.log.warn("card log entry did not settle its purchase", { transaction: entry.transactionRef, error: (e as Error).message }),
        ),
    );
    return Promise.all(each).then(() => undefined);
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
    this.reconcile(terminalId, slot).catch((e: unknown) => this.o.log.error("reconciliation failed", { terminal: terminalId, error: (e as Error).message }));
  }

  private async reconcile(terminalId: string, slot: PsamSlot): Promise<void> {
    const psam = hexOf(slot.psamId?.value);
    const waiting = await this.o.store.onPsam(psam, ["DEBIT_RESPONSE_RECEIVED", "IN_DOUBT", "PROVEN"]);
    await this.settleWaiting(waiting.filter((p) => "terminal_id" in p && p.terminal_id === terminalId));
    for (const open of slot.pendingDebits) {
      const id = open.transactionId?.value ?? "";
      if (!id) continue;
      const live = (p: Purchase) => "psam_id" in p && p.psam_id === psam && p.psam_counter === open.psamCounter;
      // Most open debits are live (their DEBIT command awaits the card): told apart without the lock, since a record never stops pointing to its debit.
      const seen = await this.o.store.get(id);
      if (!seen || live(seen)) continue; // not ours (another payment server's, or an operator's test), or live
      await this.o.locks
        .run(id, { deadline: Date.now() + ORPHAN_LOCK_WAIT_MS }, () => this.reverseOrphan(id, terminalId, psam, open.psamCounter, live))
        .catch((e: unknown) => {
          if (!(e instanceof LockBusy)) throw e;
          this.o.log.info("an open debit waits for its purchase's lock: looked at again when its terminal is announced next", { transaction: id, psam });
        });
    }
  }

  /**
   * Reverses an open debit no record points to, under its purchase's lock.
   * On a database replicas share, a purchase still RECEIVED is ended first
   * (REFUSED, DRAW_REQUEST_ABANDONED), and the debit reversed only once it
   * is: a lock can be lost while its holder goes on (its connection cut, the
   * database restarted), and that holder may be the replica whose PSAM
   * signed this very debit, about to record its DEBIT command and send it.
   * Ended first, its record (conditional on RECEIVED) changes nothing and it
   * answers with the ending, so no card is ever sent a command whose debit
   * was reversed. Read again once the PSAM is leased, for the same reason.
   */
  private async reverseOrphan(id: string, terminalId: string, psam: string, psamCounter: number, live: (p: Purchase) => boolean): Promise<void> {
    const p = await this.o.store.get(id);
    if (!p || live(p)) return;
    if (p.state === "RECEIVED" && this.o.locks.shared) {
      const why = `PSAM ${psam} signed a DEBIT command for it (counter ${psamCounter}) that was never recorded`;
      const ended = await this.end(
        p,
        `${why}, and that debit is reversed`,
        `${why}: ended before that debit is reversed, so that no DEBIT command for it can leave any replica now`,
      );
      if (ended) this.o.log.info("draw request ended: its PSAM holds a debit no record carries", { transaction: id, psam, psamCounter });
      const now = ended ?? (await this.o.store.get(id));
      if (!now || now.state === "RECEIVED" || live(now)) return;
    }
    // Reversed already (the PSAM confirmed it; its report of the debit came before that): nothing more to ask of the PSAM.
    const reversed = orphanReversed(psam, psamCounter);
    if (await this.o.store.hasStep(id, reversed)) return;
    const lease = await this.o.work.leaseSigningPsam(terminalId, psam);
    if (!lease) return;
    try {
      const now = await this.o.store.get(id);
      if (!now || live(now) || (now.state === "RECEIVED" && this.o.locks.shared)) return;
      // Logged only when the PSAM's MAC over the reversal verifies (a refused one is logged as such), and once.
      if ((await this.o.work.reverse(lease, now, psamCounter, backgroundDeadline())) === true) await this.o.store.logOnce(id, reversed);
    } finally {
      this.o.pool.release(lease);
    }
  }
}

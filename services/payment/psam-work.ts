// PSAM jobs for one purchase: taking the PSAM that signed its DEBIT command
// (held since the draw request, or leased again), running a job on it within
// the caller's time, and holding or releasing it as the mode allows.

import { PsamJobStatus, type PsamJob, type PsamJobResult } from "../../gen/netpurse/terminal/v1/terminal.js";
import { swHex } from "../../lib/apdu/apdu.js";
import { txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import type { PaymentStore, PurchaseRow } from "./store.js";
import { NoPsamFree, type ConcentratorLink, type Lease, type PsamPool } from "./terminal-pool.js";

/** The least time worth giving a terminal for one job; with less left, no job is sent. */
export const MIN_JOB_MS = 1_000;

export const psamKeyOf = (row: PurchaseRow) => `${row.terminal_id}/${row.psam_id}`;

/** A PSAM that could not be reached, and why. */
export class PsamUnreachable {
  constructor(readonly why: string) {}
}

export class PsamWork {
  /** PSAMs held across the cardholder's round trip (PSAM_VERIFIES). */
  private readonly holds = new Map<string, { lease: Lease; timer: NodeJS.Timeout }>();

  constructor(
    readonly o: {
      pool: PsamPool;
      link: ConcentratorLink;
      store: PaymentStore;
      log: Logger;
      holdTimeoutMs: number;
      jobTimeoutMs: number;
    },
  ) {}

  jobTimeout(deadline: number): number {
    return Math.max(MIN_JOB_MS, Math.min(this.o.jobTimeoutMs, deadline - Date.now()));
  }

  run(lease: Lease, transactionId: string, task: PsamJob["task"], deadline: number): Promise<PsamJobResult> {
    return this.o.link.runJob(lease, { transactionId: txnId(transactionId), task }, this.jobTimeout(deadline));
  }

  /** Keeps the PSAM for the cardholder's answer, but not forever. */
  hold(transactionId: string, lease: Lease): void {
    const timer = setTimeout(() => {
      if (this.holds.get(transactionId)?.lease !== lease) return;
      this.holds.delete(transactionId);
      void this.giveBack(transactionId, lease, "no card answer in time; its debit stays open");
    }, this.o.holdTimeoutMs);
    timer.unref();
    this.holds.set(transactionId, { lease, timer });
  }

  /** Gives a purchase's PSAM back to the pool and logs how long the purchase held it (from the lease to now). */
  async giveBack(transactionId: string, lease: Lease, why: string): Promise<void> {
    this.o.pool.release(lease);
    await this.o.store.log(transactionId, { step: "psam_released", detail: `PSAM ${lease.psamId} held ${Date.now() - lease.takenAt} ms: ${why}` });
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
  async onSigningPsam<T>(row: PurchaseRow, deadline: number, fn: (lease: Lease) => Promise<T>): Promise<T | PsamUnreachable> {
    const held = this.takeHold(row.transaction_id);
    let lease = held;
    if (!lease) {
      if (!this.o.pool.has(psamKeyOf(row))) return new PsamUnreachable(`PSAM ${row.psam_id} of terminal ${row.terminal_id} is not in the pool`);
      try {
        lease = await this.o.pool.acquire({ key: psamKeyOf(row) }, Math.min(deadline, Date.now() + 5_000));
      } catch (e) {
        if (e instanceof NoPsamFree) return new PsamUnreachable(e.message);
        throw e;
      }
    }
    try {
      return await fn(lease);
    } finally {
      if (held) await this.giveBack(row.transaction_id, lease, "the card's answer is ruled on");
      else this.o.pool.release(lease);
    }
  }

  /** REVERSE DEBIT on the signing PSAM: true once the PSAM confirms, or why not. */
  async reverse(row: PurchaseRow, lease: Lease, deadline: number): Promise<true | PsamUnreachable> {
    const r = await this.run(
      lease,
      row.transaction_id,
      { $case: "reverseDebit", value: { psamCounter: row.psam_counter! } },
      Math.max(deadline, Date.now() + MIN_JOB_MS),
    );
    if (r.status === PsamJobStatus.PSAM_JOB_STATUS_OK) return true;
    return new PsamUnreachable(`reversal not confirmed by the PSAM: ${describe(r)}`);
  }

  releaseAll(): void {
    for (const id of [...this.holds.keys()]) {
      const l = this.takeHold(id);
      if (l) this.o.pool.release(l);
    }
  }
}

export function describe(r: PsamJobResult): string {
  return `${PsamJobStatus[r.status]}${r.statusWord ? ` SW ${swHex(r.statusWord)}` : ""}${r.message ? ` ${r.message}` : ""}`;
}

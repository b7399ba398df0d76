// Every settled load goes to clearing (issue #11): its record with what
// clearing needs to check it again (the authorised load, the card's
// INITIALIZE FOR LOAD answer, the signed LOAD command and the card's LOAD
// answer with S3), and its outcome. Loads wait in the outbox the settlement
// wrote (store.ts) until clearing acknowledges them; a wake-up after each
// settlement sends them at once, a timer sends what an outage left, and
// clearing being down never holds up a load.

import { ClientError, Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import {
  LoadOutcome,
  LoadProof,
  LoadStatus,
  loadStatusToJSON,
  quarantineReasonToJSON,
  type ClearingServiceDefinition,
  type LoadAcknowledgement,
  type LoadRecord,
} from "../../gen/netpurse/clearing/v1/clearing.js";
import { DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { reasonName, reasonOf } from "../../lib/grpc/errors.js";
import { purseId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { money } from "../../lib/money.js";
import { InitializeForLoadResponse, LoadResponse, LoadResult } from "../../lib/protocol/load.js";
import type { LoadRow, LoadStore, ProofKind, UnreportedLoad } from "./store.js";

/** Loads per SubmitLoads request: the contract's maximum. */
export const LOADS_PER_REQUEST = 100;

const PROOF: Partial<Record<ProofKind, LoadProof>> = {
  S3: LoadProof.LOAD_PROOF_S3,
  CARD_HISTORY: LoadProof.LOAD_PROOF_CARD_HISTORY,
  NEGATIVE_RESULT: LoadProof.LOAD_PROOF_NEGATIVE_RESULT,
  NEGATIVE_RESULT_UNPROVEN: LoadProof.LOAD_PROOF_NEGATIVE_RESULT_UNPROVEN,
};

/**
 * The card's LOAD answer for a load its S3 proves. The load server keeps the
 * S3 and the counter; the rest is fixed by what provesCredit accepted (result
 * LOADED, counter one above the INITIALIZE answer's, balance that answer's
 * plus the amount), so these are the very bytes the security module verified.
 */
function loadAnswerOf(row: LoadRow): Buffer {
  const init = InitializeForLoadResponse.decode(row.initialize_response);
  return LoadResponse.encode({ result: LoadResult.LOADED, counter: row.card_counter!, balance: init.balance + row.amount_minor, s3: row.card_signature! });
}

/** A settled load as clearing's LoadRecord. */
export function loadRecordOf(row: LoadRow): LoadRecord {
  const proof = row.proof_kind ? PROOF[row.proof_kind] : undefined;
  if (proof === undefined || !row.load_command || !row.settled_at) throw new Error(`load ${row.transaction_id} is not a settled load with a LOAD command`);
  const s3 = proof === LoadProof.LOAD_PROOF_S3 || proof === LoadProof.LOAD_PROOF_CARD_HISTORY;
  return {
    transactionId: txnId(row.transaction_id),
    bankId: row.bank_id,
    purseId: purseId(row.purse_id),
    amount: money(row.amount_minor, row.currency, row.exponent),
    outcome: row.outcome === "LOADED" ? LoadOutcome.LOAD_OUTCOME_LOADED : LoadOutcome.LOAD_OUTCOME_NOT_LOADED,
    proof,
    authorised: row.authorised,
    initializeResponse: row.initialize_response,
    loadCommand: row.load_command,
    loadAnswer: s3 ? loadAnswerOf(row) : Buffer.alloc(0),
    settledAt: new Date(row.settled_at),
  };
}

/** Refusals of the request's content: one load of the request is at fault, and sending it again changes nothing. */
const CONTENT_REFUSALS: readonly Status[] = [Status.ALREADY_EXISTS, Status.INVALID_ARGUMENT];

const explain = (e: unknown) => {
  if (!(e instanceof ClientError)) return e instanceof Error ? e.message : String(e);
  const reason = reasonOf(e);
  return `${Status[e.code]}${reason === undefined ? "" : ` ${reasonName(reason).replace(/^ERROR_REASON_/, "")}`}: ${e.details}`;
};

export interface ClearingReporterOptions {
  store: LoadStore;
  clearing: Client<typeof ClearingServiceDefinition, DeadlineOptions>;
  log: Logger;
  /** How often the outbox is looked at while clearing answers (default 10 s); a settlement wakes it at once. */
  everyMs?: number;
  /** The first retry after clearing could not be reached (default 1 s), doubled on each failure up to maxBackoffMs (default 60 s). */
  firstBackoffMs?: number;
  maxBackoffMs?: number;
  /** Deadline of one SubmitLoads call (default DEFAULT_DEADLINE_MS). */
  deadlineMs?: number;
}

export class ClearingReporter {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  /** A settlement arrived while a pass ran: run another before resting. */
  private again = false;
  /** The wait before the next attempt while clearing cannot be reached; 0 when it answers. */
  private backoffMs = 0;
  private closed = false;
  private readonly abort = new AbortController();

  constructor(private readonly o: ClearingReporterOptions) {}

  /** Starts reporting: first what an earlier run left in the outbox, then on every wake-up and timer. */
  start(): void {
    this.run();
  }

  /** A load was settled: report it now, unless clearing is unreachable and the back-off's own retry will carry it. */
  wake(): void {
    if (this.backoffMs === 0) this.run();
  }

  /**
   * Sends everything waiting, 100 loads a request, until the outbox is empty;
   * rejects when clearing cannot be reached. A pass under way takes in what
   * was settled meanwhile. Each pass schedules the next: the timer after a
   * pass that emptied the outbox, the back-off after one that failed.
   */
  flush(): Promise<void> {
    if (this.running) {
      this.again = true;
      return this.running;
    }
    clearTimeout(this.timer);
    const pass = (async () => {
      do {
        this.again = false;
        await this.pass();
      } while (this.again && !this.closed);
    })().finally(() => (this.running = undefined));
    this.running = pass;
    pass.then(
      () => {
        this.backoffMs = 0;
        this.schedule(this.o.everyMs ?? 10_000);
      },
      (e: unknown) => {
        if (this.closed) return;
        this.backoffMs = this.backoffMs ? Math.min(this.backoffMs * 2, this.o.maxBackoffMs ?? 60_000) : (this.o.firstBackoffMs ?? 1_000);
        this.o.log.warn("settled loads not reported to clearing yet; trying again", { inMs: this.backoffMs, error: explain(e) });
        this.schedule(this.backoffMs);
      },
    );
    return pass;
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    this.abort.abort();
    await this.running?.catch(() => undefined);
  }

  /** A pass whose outcome only schedules the next (flush handles it). */
  private run(): void {
    if (!this.closed) this.flush().catch(() => undefined);
  }

  private schedule(ms: number): void {
    if (this.closed) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.run(), ms);
    this.timer.unref();
  }

  private async pass(): Promise<void> {
    for (;;) {
      if (this.closed) return;
      const rows = await this.o.store.unreported(LOADS_PER_REQUEST);
      if (!rows.length) return;
      const sendable = [];
      for (const row of rows) {
        try {
          sendable.push({ row, record: loadRecordOf(row) });
        } catch (e) {
          // A row no record can be made of would otherwise stop every load behind it.
          await this.o.store.setAside(row.transaction_id, `not reportable: ${explain(e)}`);
          this.o.log.error("a settled load cannot be reported to clearing: set aside", { transaction: row.transaction_id, error: explain(e) });
        }
      }
      if (sendable.length) await this.submit(sendable);
    }
  }

  /**
   * One SubmitLoads. A refusal of the request's content (ALREADY_EXISTS: a load
   * of that id with other content; INVALID_ARGUMENT) records nothing of it:
   * the loads go again one by one, so that the others are recorded and the
   * one at fault is named and set aside. Any other failure leaves them all
   * queued and ends the pass.
   */
  private async submit(loads: { row: UnreportedLoad; record: LoadRecord }[]): Promise<void> {
    const ids = loads.map((l) => l.row.transaction_id);
    let acks: LoadAcknowledgement[];
    try {
      const r = await this.o.clearing.submitLoads(
        { loads: loads.map((l) => l.record) },
        { deadline: this.o.deadlineMs ?? DEFAULT_DEADLINE_MS, signal: this.abort.signal },
      );
      acks = r.acknowledgements;
    } catch (e) {
      if (this.closed) return;
      if (!(e instanceof ClientError) || !CONTENT_REFUSALS.includes(e.code)) {
        await this.o.store.attempted(ids, explain(e));
        throw e;
      }
      if (loads.length > 1) {
        this.o.log.warn("clearing refused a request of loads; sending them one by one to find the load at fault", { loads: loads.length, error: explain(e) });
        for (const l of loads) await this.submit([l]);
        return;
      }
      await this.o.store.setAside(ids[0]!, `refused by clearing: ${explain(e)}`);
      this.o.log.error("clearing refused a settled load: it is set aside, not sent again; the operator must look into it", {
        transaction: ids[0],
        error: explain(e),
      });
      return;
    }
    await this.acknowledged(ids, acks);
  }

  private async acknowledged(ids: string[], acks: LoadAcknowledgement[]): Promise<void> {
    const byId = new Map(acks.map((a) => [a.transactionId?.value, a]));
    const done = ids.flatMap((id) => {
      const a = byId.get(id);
      return a && a.status !== LoadStatus.LOAD_STATUS_UNSPECIFIED && a.status !== LoadStatus.UNRECOGNIZED ? [{ id, a }] : [];
    });
    await this.o.store.reported(
      done.map(({ id, a }) => ({
        id,
        status: loadStatusToJSON(a.status).replace("LOAD_STATUS_", ""),
        duplicate: a.duplicate,
        settlementDay: a.settlementDay,
      })),
    );
    for (const { id, a } of done) {
      const fields = { transaction: id, settlementDay: a.settlementDay || undefined, duplicate: a.duplicate || undefined };
      if (a.status === LoadStatus.LOAD_STATUS_QUARANTINED) {
        // Reported nonetheless: clearing keeps it, and the operator finds it in ListQuarantined.
        this.o.log.error("clearing quarantined a load: its proof does not verify there", { ...fields, reason: quarantineReasonToJSON(a.quarantinedBecause) });
      } else {
        this.o.log.info("load reported to clearing", { ...fields, status: loadStatusToJSON(a.status) });
      }
    }
    if (done.length < ids.length) {
      const missing = ids.filter((id) => !done.some((d) => d.id === id));
      await this.o.store.attempted(missing, "clearing's answer did not acknowledge this load");
      throw new Error(`clearing's answer did not acknowledge ${missing.length} of ${ids.length} loads (${missing.join(", ")})`);
    }
  }
}

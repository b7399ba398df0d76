// The terminal host's batch submitter: it sends each closed batch in the
// host's outbox to clearing (ClearingService.SubmitBatch: the records, then
// the trailer), oldest first, and takes it out of the outbox only once
// clearing has acknowledged it. It runs beside the PSAM jobs and holds no
// PSAM: a slow or absent clearing service delays submission, never a
// purchase. A batch is sent again after an outage or a restart until its
// acknowledgement is stored; clearing counts a batch sent twice once.

import { ClientError, Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import {
  BatchStatus,
  ClearingServiceDefinition,
  QuarantineReason,
  type SubmitBatchRequest,
  type SubmitBatchResponse,
} from "../../gen/netpurse/clearing/v1/clearing.js";
import { crashPoints } from "../../lib/crash-point.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { reasonName, reasonOf } from "../../lib/grpc/errors.js";
import { hexOf, psamId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { money } from "../../lib/money.js";
import type { Security } from "../../lib/pki/security.js";
import { batchRecordMessage } from "../clearing/records.js";
import type { StoredBatch, StoredTransaction, TerminalStore } from "./store.js";

/**
 * Test-only kill point, NETPURSE_TEST_TERMINAL_CRASH_AT:
 *   after-batch-sent  the whole batch was sent and clearing answered; the host dies before it reads the answer
 *   after-close-batch the PSAM closed a batch; the host dies before the batch is in its outbox (services/terminal/terminal-host.ts)
 */
export const terminalCrashPoint = crashPoints("NETPURSE_TEST_TERMINAL_CRASH_AT", "terminal host");

export interface BatchSubmitterOptions {
  clearingAddress: string;
  /** TLS to clearing, as this terminal's identity. */
  security: Security;
  store: TerminalStore;
  log: Logger;
  /** Deadline of one batch's submission (default 30 s). */
  deadlineMs?: number;
  /** First wait after clearing could not be reached; it doubles up to retryMaxMs (default 1 s). */
  retryMinMs?: number;
  /** Longest wait between attempts while clearing cannot be reached (default 30 s). */
  retryMaxMs?: number;
  /** Wait before a PSAM's batches are tried again after clearing refused the host for them (default 5 minutes): an operator must act. */
  refusedRetryMs?: number;
}

/** What the submitter does after an attempt failed. */
type Failure = { wait: "backoff" } | { wait: "psam"; ms: number } | { setAside: "rejected" | "incomplete" };

export const SUBMITTER_DEFAULTS = { deadlineMs: 30_000, retryMinMs: 1_000, retryMaxMs: 30_000, refusedRetryMs: 300_000 } as const;

export class BatchSubmitter {
  private readonly channel;
  private readonly client: Client<typeof ClearingServiceDefinition, DeadlineOptions>;
  private readonly abort = new AbortController();
  private stopped = false;
  private loop: Promise<void> | undefined;
  private wakeUp: (() => void) | undefined;
  private woken = false;
  private backoffMs: number;
  /** PSAMs whose batches wait (clearing refused the host for them), until when (ms since the epoch). */
  private readonly heldUntil = new Map<string, number>();
  private readonly d: Required<Pick<BatchSubmitterOptions, "deadlineMs" | "retryMinMs" | "retryMaxMs" | "refusedRetryMs">>;

  constructor(private readonly o: BatchSubmitterOptions) {
    this.d = {
      deadlineMs: o.deadlineMs ?? SUBMITTER_DEFAULTS.deadlineMs,
      retryMinMs: o.retryMinMs ?? SUBMITTER_DEFAULTS.retryMinMs,
      retryMaxMs: o.retryMaxMs ?? SUBMITTER_DEFAULTS.retryMaxMs,
      refusedRetryMs: o.refusedRetryMs ?? SUBMITTER_DEFAULTS.refusedRetryMs,
    };
    this.backoffMs = this.d.retryMinMs;
    this.channel = openChannel(o.clearingAddress, o.security.channel({ kind: "clearing" }));
    this.client = clientFactory().create(ClearingServiceDefinition, this.channel);
  }

  /** Starts sending what the outbox holds (after a restart: what was not acknowledged before it). */
  start(): void {
    this.loop ??= this.run();
  }

  /** Looks at the outbox now (a batch was just closed), without waiting out a back-off. */
  wake(): void {
    this.woken = true;
    this.wakeUp?.();
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.abort.abort();
    this.wakeUp?.();
    await this.loop;
    this.channel.close();
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      let waitMs: number;
      try {
        waitMs = await this.sendNext();
      } catch (e) {
        // The store failed under it: try again later, never end the loop.
        this.o.log.error("batch submitter: could not read or write the outbox", { error: (e as Error).message });
        waitMs = this.d.retryMaxMs;
      }
      if (waitMs > 0) await this.sleep(waitMs);
    }
  }

  /** Waits `ms`, or less when woken. */
  private sleep(ms: number): Promise<void> {
    if (this.woken || this.stopped) {
      this.woken = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.wakeUp = undefined;
        this.woken = false;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.wakeUp = done;
    });
  }

  /** Sends the oldest batch it may send now; answers how long to wait before the next look (0: at once). */
  private async sendNext(): Promise<number> {
    const now = Date.now();
    const outbox = await this.o.store.outbox();
    const batch = outbox.find((b) => (this.heldUntil.get(b.psam_id) ?? 0) <= now);
    if (!batch) {
      const held = outbox.map((b) => this.heldUntil.get(b.psam_id) ?? now).filter((t) => t > now);
      // Nothing to send: a closed batch wakes the submitter; a long look now and then catches a batch written by the sync at start.
      return held.length ? Math.min(...held) - now : 60_000;
    }
    let ack: SubmitBatchResponse;
    try {
      ack = await this.submit(batch);
    } catch (e) {
      if (this.stopped) return 0; // the host is stopping: the batch stays in the outbox for the next start
      const failure = this.failure(batch, e);
      await this.o.store.noteAttempt(batch.psam_id, batch.batch_number, describe(e));
      if ("setAside" in failure) {
        await this.o.store.setAside(batch.psam_id, batch.batch_number, failure.setAside, describe(e));
        return 0;
      }
      if (failure.wait === "psam") {
        this.heldUntil.set(batch.psam_id, Date.now() + failure.ms);
        return 0;
      }
      const wait = this.backoffMs + Math.floor(Math.random() * (this.backoffMs / 2));
      this.backoffMs = Math.min(this.backoffMs * 2, this.d.retryMaxMs);
      return Math.min(wait, this.d.retryMaxMs);
    }
    this.backoffMs = this.d.retryMinMs;
    this.heldUntil.delete(batch.psam_id);
    await this.acknowledged(batch, ack);
    return 0;
  }

  /** Streams one batch: its records as the store holds them, then its trailer; resolves with clearing's acknowledgement. */
  private async submit(b: StoredBatch): Promise<SubmitBatchResponse> {
    const records = await this.o.store.batchRecords(b.psam_id, b.batch_number);
    const total = records.reduce((t, r) => t + r.amount_minor, 0);
    if (records.length !== b.record_count || total !== b.total_minor) {
      throw new IncompleteBatch(
        `the host holds ${records.length} records totalling ${total} of batch ${b.batch_number}, whose trailer says ${b.record_count} totalling ${b.total_minor}: ` +
          "it cannot be sent whole (clearing will report its number as missing)",
      );
    }
    async function* messages(): AsyncIterable<SubmitBatchRequest> {
      for (const r of records) yield { item: { $case: "record", value: recordMessage(r) } };
      yield {
        item: {
          $case: "trailer",
          value: {
            psamId: psamId(b.psam_id),
            batchNumber: b.batch_number,
            count: b.record_count,
            total: money(b.total_minor, b.currency, 0),
            batchMac: Buffer.from(b.batch_mac, "hex"),
            closedAt: new Date(b.closed_at),
          },
        },
      };
    }
    const ack = await this.client.submitBatch(messages(), { deadline: this.d.deadlineMs, signal: this.abort.signal });
    terminalCrashPoint("after-batch-sent");
    if (hexOf(ack.psamId?.value) !== b.psam_id || ack.batchNumber !== b.batch_number) {
      throw new Error(`clearing acknowledged batch ${ack.batchNumber} of PSAM ${hexOf(ack.psamId?.value)} for batch ${b.batch_number} of PSAM ${b.psam_id}`);
    }
    return ack;
  }

  private async acknowledged(b: StoredBatch, ack: SubmitBatchResponse): Promise<void> {
    const what = { psam: b.psam_id, batch: b.batch_number, count: b.record_count, total: b.total_minor };
    if (ack.missingBatchNumbers.length) {
      this.o.log.warn("clearing misses earlier batches of this PSAM", { ...what, missing: ack.missingBatchNumbers.join(",") });
    }
    if (ack.status === BatchStatus.BATCH_STATUS_ACCEPTED) {
      await this.o.store.acknowledge(b.psam_id, b.batch_number, { posted: ack.posted, quarantined: ack.quarantined, settlementDay: ack.settlementDay });
      this.o.log.info("batch acknowledged by clearing", {
        ...what,
        posted: ack.posted,
        quarantined: ack.quarantined,
        duplicate: ack.duplicate,
        day: ack.settlementDay,
      });
      if (ack.quarantined > 0) this.o.log.warn("clearing quarantined records of the batch: they are not paid", { ...what, quarantined: ack.quarantined });
      return;
    }
    const why =
      ack.status === BatchStatus.BATCH_STATUS_REJECTED
        ? `rejected by clearing: ${QuarantineReason[ack.rejectedBecause] ?? ack.rejectedBecause}`
        : `clearing answered status ${ack.status}`;
    await this.o.store.setAside(b.psam_id, b.batch_number, "rejected", why);
    this.o.log.error("clearing rejected the batch; it is not sent again (netpurse-operator lists it among the quarantined)", { ...what, why });
  }

  /** What an attempt's failure calls for. */
  private failure(b: StoredBatch, e: unknown): Failure {
    const what = { psam: b.psam_id, batch: b.batch_number };
    if (e instanceof IncompleteBatch) {
      this.o.log.error("batch cannot be sent whole; set aside", { ...what, error: e.message });
      return { setAside: "incomplete" };
    }
    if (!(e instanceof ClientError)) {
      this.o.log.warn("batch not sent; trying again", { ...what, error: (e as Error).message });
      return { wait: "backoff" };
    }
    const reason = reasonOf(e);
    switch (e.code) {
      case Status.UNAVAILABLE:
      case Status.DEADLINE_EXCEEDED:
      case Status.CANCELLED:
      case Status.RESOURCE_EXHAUSTED:
      case Status.ABORTED:
        this.o.log.warn("clearing not reached; the batch waits in the outbox", { ...what, error: e.details, backoffMs: this.backoffMs });
        return { wait: "backoff" };
      case Status.PERMISSION_DENIED:
      case Status.UNAUTHENTICATED:
      case Status.INVALID_ARGUMENT:
        // Sending again changes nothing until someone acts (the PSAM registry, the certificate, the host's code): this PSAM's batches wait, the others go.
        this.o.log.error("clearing refuses this PSAM's batch; it is tried again later", {
          ...what,
          code: Status[e.code],
          reason: reason === undefined ? "" : reasonName(reason),
          error: e.details,
          retryInMs: this.d.refusedRetryMs,
        });
        return { wait: "psam", ms: this.d.refusedRetryMs };
      case Status.ALREADY_EXISTS:
        this.o.log.error("clearing holds another batch of this number from this PSAM; this one is set aside, not sent again", {
          ...what,
          reason: reason === undefined ? "" : reasonName(reason),
          error: e.details,
        });
        return { setAside: "rejected" };
      default:
        this.o.log.warn("batch not sent; trying again", { ...what, code: Status[e.code], error: e.details });
        return { wait: "backoff" };
    }
  }
}

class IncompleteBatch extends Error {}

const describe = (e: unknown) => (e instanceof ClientError ? `${Status[e.code]}: ${e.details}` : (e as Error).message);

/** A stored record as clearing takes it. */
function recordMessage(r: StoredTransaction) {
  return batchRecordMessage({
    psamCounter: r.psam_counter,
    purseId: Buffer.from(r.purse_id, "hex"),
    keyVersion: r.key_version,
    sessionCounter: r.session_counter,
    challenge: Buffer.from(r.challenge, "hex"),
    cardCounter: r.card_counter,
    balanceAfter: r.balance_after,
    amount: r.amount_minor,
    currency: r.currency,
    dateTime: r.date_time,
    transactionRef: r.transaction_id,
    merchantId: r.merchant_id,
    cardSignature: Buffer.from(r.card_signature, "hex"),
    recordMac: Buffer.from(r.record_mac, "hex"),
  });
}

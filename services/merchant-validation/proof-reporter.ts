// MERCHANT_COMPARES: once the merchant has compared the card's signature, the
// card's proof must still reach the payment server and the PSAM's batch, or
// clearing will not pay for the debit. Proofs wait in an outbox (written
// before the goods go out) and are sent until the payment server
// acknowledges them.

import { DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { ClientError, Status } from "nice-grpc";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import type { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import type { Logger } from "../../lib/log.js";
import { repeat, type Periodic } from "../../lib/periodic.js";
import type { Db } from "../../lib/store/db.js";

export const VALIDATION_MIGRATIONS = [
  `CREATE TABLE proof_outbox (
     transaction_id TEXT PRIMARY KEY,
     debit_response BLOB NOT NULL,
     state TEXT NOT NULL,
     attempts INTEGER NOT NULL,
     last_error TEXT,
     queued_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );`,
];

interface OutboxRow {
  transaction_id: string;
  debit_response: Buffer;
  attempts: number;
}

export class ProofReporter {
  private timer: Periodic | undefined;
  private running: Promise<void> | undefined;

  constructor(private readonly o: { db: Db; payment: Client<typeof PaymentServiceDefinition, DeadlineOptions>; log: Logger; retryEveryMs?: number }) {}

  /** Queues a proof (idempotent) and tries to send it now. */
  async enqueue(transactionId: string, debitResponse: Buffer): Promise<void> {
    const now = new Date().toISOString();
    await this.o.db.run(
      "INSERT INTO proof_outbox (transaction_id, debit_response, state, attempts, queued_at, updated_at) VALUES (?, ?, 'QUEUED', 0, ?, ?) ON CONFLICT (transaction_id) DO NOTHING",
      [transactionId, debitResponse, now, now],
    );
    this.kick();
  }

  /** Sends what waits, one pass; a pass already running is awaited instead. */
  flush(): Promise<void> {
    this.running ??= this.pass().finally(() => (this.running = undefined));
    return this.running;
  }

  private kick(): void {
    this.flush().catch((e: unknown) => this.o.log.warn("card proofs not reported yet; retried later", { error: (e as Error).message }));
  }

  private async pass(): Promise<void> {
    for (const row of await this.o.db.all<OutboxRow>(
      "SELECT transaction_id, debit_response, attempts FROM proof_outbox WHERE state = 'QUEUED' ORDER BY queued_at",
    )) {
      try {
        await this.o.payment.reportCardSignature(
          { transactionId: { value: row.transaction_id }, debitResponse: row.debit_response },
          { deadline: DEFAULT_DEADLINE_MS },
        );
        await this.mark(row, "ACKNOWLEDGED", null);
        this.o.log.info("card proof acknowledged by the payment server", { transaction: row.transaction_id });
      } catch (e) {
        const final =
          e instanceof ClientError &&
          [Status.PERMISSION_DENIED, Status.NOT_FOUND, Status.ALREADY_EXISTS, Status.INVALID_ARGUMENT, Status.FAILED_PRECONDITION].includes(e.code);
        await this.mark(row, final ? "REFUSED" : "QUEUED", (e as Error).message);
        this.o.log[final ? "error" : "warn"]("card proof not acknowledged", { transaction: row.transaction_id, final, error: (e as Error).message });
      }
    }
  }

  private async mark(row: OutboxRow, state: string, error: string | null): Promise<void> {
    await this.o.db.run("UPDATE proof_outbox SET state = ?, attempts = attempts + 1, last_error = ?, updated_at = ? WHERE transaction_id = ?", [
      state,
      error,
      new Date().toISOString(),
      row.transaction_id,
    ]);
  }

  start(): void {
    this.timer = repeat({ what: "report of card proofs", everyMs: this.o.retryEveryMs ?? 10_000, log: this.o.log, task: () => this.flush() });
  }

  async close(): Promise<void> {
    this.timer?.stop();
    this.timer = undefined;
    await this.running?.catch(() => undefined);
  }

  /** The outbox, for tests and operators. */
  rows(): Promise<{ transaction_id: string; state: string; attempts: number; last_error: string | null }[]> {
    return this.o.db.all("SELECT transaction_id, state, attempts, last_error FROM proof_outbox ORDER BY queued_at");
  }
}

// The terminal host's own data store (step 630): every transaction its PSAMs
// recorded, every reversal, and every closed batch.

import type { Db } from "../../lib/store/db.js";
import type { PsamBatchRecord } from "../../lib/protocol/psam.js";

export const TERMINAL_MIGRATIONS = [
  `CREATE TABLE psam_transactions (
     psam_id TEXT NOT NULL,
     psam_counter INTEGER NOT NULL,
     batch_number INTEGER NOT NULL,
     transaction_id TEXT NOT NULL,
     purse_id TEXT NOT NULL,
     card_counter INTEGER NOT NULL,
     amount_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     merchant_id TEXT NOT NULL,
     date_time INTEGER NOT NULL,
     card_signature TEXT NOT NULL,
     record_mac TEXT NOT NULL,
     job_id TEXT NOT NULL,
     recorded_at TEXT NOT NULL,
     PRIMARY KEY (psam_id, psam_counter)
   );
   CREATE TABLE psam_reversals (
     psam_id TEXT NOT NULL,
     psam_counter INTEGER NOT NULL,
     transaction_id TEXT NOT NULL,
     reason TEXT NOT NULL,
     reversed_at TEXT NOT NULL,
     PRIMARY KEY (psam_id, psam_counter)
   );
   CREATE TABLE psam_batches (
     psam_id TEXT NOT NULL,
     batch_number INTEGER NOT NULL,
     record_count INTEGER NOT NULL,
     total_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     batch_mac TEXT NOT NULL,
     closed_at TEXT NOT NULL,
     PRIMARY KEY (psam_id, batch_number)
   );`,
  // Whose transaction each DEBIT command was issued for, as the concentrator said from the payment server's certificate.
  `CREATE TABLE debit_owners (
     transaction_id TEXT PRIMARY KEY,
     payment_server_id TEXT NOT NULL,
     claimed_at TEXT NOT NULL
   );`,
];

export interface StoredTransaction {
  psam_id: string;
  psam_counter: number;
  batch_number: number;
  transaction_id: string;
  purse_id: string;
  card_counter: number;
  amount_minor: number;
  currency: number;
  merchant_id: string;
  card_signature: string;
  record_mac: string;
}

export class TerminalStore {
  constructor(private readonly db: Db) {}

  async recordTransaction(psamId: string, batchNumber: number, r: PsamBatchRecord, jobId: string): Promise<void> {
    // A retried job finds the row there already: record it once.
    await this.db.run(
      `INSERT INTO psam_transactions (psam_id, psam_counter, batch_number, transaction_id, purse_id, card_counter, amount_minor, currency,
         merchant_id, date_time, card_signature, record_mac, job_id, recorded_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (psam_id, psam_counter) DO NOTHING`,
      [
        psamId,
        r.psamCounter,
        batchNumber,
        r.transactionRef,
        r.purseId.toString("hex"),
        r.cardCounter,
        r.amount,
        r.currency,
        r.merchantId,
        r.dateTime,
        r.cardSignature.toString("hex"),
        r.recordMac.toString("hex"),
        jobId,
        new Date().toISOString(),
      ],
    );
  }

  async recordReversal(psamId: string, psamCounter: number, transactionId: string, reason: string): Promise<void> {
    await this.db.run(
      "INSERT INTO psam_reversals (psam_id, psam_counter, transaction_id, reason, reversed_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (psam_id, psam_counter) DO NOTHING",
      [psamId, psamCounter, transactionId, reason, new Date().toISOString()],
    );
  }

  async recordBatch(b: { psamId: Buffer; batchNumber: number; count: number; total: number; currency: number; batchMac: Buffer }): Promise<void> {
    await this.db.run(
      "INSERT INTO psam_batches (psam_id, batch_number, record_count, total_minor, currency, batch_mac, closed_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
      [b.psamId.toString("hex"), b.batchNumber, b.count, b.total, b.currency, b.batchMac.toString("hex"), new Date().toISOString()],
    );
  }

  /**
   * Records that `paymentServerId` asks for a DEBIT command for this
   * transaction; false when another payment server already did.
   */
  async claim(transactionId: string, paymentServerId: string): Promise<boolean> {
    const r = await this.db.run("INSERT INTO debit_owners (transaction_id, payment_server_id, claimed_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", [
      transactionId,
      paymentServerId,
      new Date().toISOString(),
    ]);
    return r.changes === 1 || (await this.ownerOf(transactionId)) === paymentServerId;
  }

  /** The payment server a transaction's DEBIT command was issued for; undefined when none was recorded. */
  async ownerOf(transactionId: string): Promise<string | undefined> {
    return (await this.db.get<{ payment_server_id: string }>("SELECT payment_server_id FROM debit_owners WHERE transaction_id = ?", [transactionId]))
      ?.payment_server_id;
  }

  /** The transaction a PSAM counter's debit was recorded or reversed for, once it is no longer open in the PSAM. */
  async settledTransaction(psamId: string, psamCounter: number): Promise<string | undefined> {
    const row =
      (await this.db.get<{ transaction_id: string }>("SELECT transaction_id FROM psam_transactions WHERE psam_id = ? AND psam_counter = ?", [
        psamId,
        psamCounter,
      ])) ??
      (await this.db.get<{ transaction_id: string }>("SELECT transaction_id FROM psam_reversals WHERE psam_id = ? AND psam_counter = ?", [
        psamId,
        psamCounter,
      ]));
    return row?.transaction_id;
  }

  transactions(): Promise<StoredTransaction[]> {
    return this.db.all<StoredTransaction>("SELECT * FROM psam_transactions ORDER BY psam_id, psam_counter");
  }

  reversals(): Promise<{ psam_id: string; psam_counter: number; transaction_id: string; reason: string }[]> {
    return this.db.all("SELECT * FROM psam_reversals ORDER BY psam_id, psam_counter");
  }
}

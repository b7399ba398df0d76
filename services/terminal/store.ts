// The terminal host's own data store (step 630): every transaction its PSAMs
// recorded, every reversal, and every closed batch. A closed batch and its
// records are the outbox: they stay until clearing acknowledges the batch;
// then the records go, and only the PSAM counter -> transaction id of each
// stays (what the ownership checks need) with the batch's acknowledgement.

import { BoundedMap } from "../../lib/bounded-map.js";
import type { Db, SqlValue } from "../../lib/store/db.js";
import type { PsamBatchRecord } from "../../lib/protocol/psam.js";

/** How many PSAM counters back the host keeps the transaction of a cleared debit: well beyond the PSAM's own 1,024 settled debits and 64 open ones. */
export const CLEARED_DEBITS_KEPT = 4096;

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
  // Batch records carry the card's session (zeros in rows written before: the sync at start rewrites the open batch's from the PSAM).
  // A closed batch is 'pending' until clearing acknowledges it ('accepted'), refuses it ('rejected'), or the host finds it cannot send it whole ('incomplete').
  `ALTER TABLE psam_transactions ADD COLUMN key_version INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE psam_transactions ADD COLUMN session_counter INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE psam_transactions ADD COLUMN challenge TEXT NOT NULL DEFAULT '0000000000000000';
   ALTER TABLE psam_transactions ADD COLUMN balance_after INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE psam_batches ADD COLUMN state TEXT NOT NULL DEFAULT 'pending';
   ALTER TABLE psam_batches ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE psam_batches ADD COLUMN last_error TEXT NOT NULL DEFAULT '';
   ALTER TABLE psam_batches ADD COLUMN acknowledged_at TEXT;
   ALTER TABLE psam_batches ADD COLUMN posted INTEGER;
   ALTER TABLE psam_batches ADD COLUMN quarantined INTEGER;
   ALTER TABLE psam_batches ADD COLUMN settlement_day TEXT;
   CREATE TABLE cleared_debits (
     psam_id TEXT NOT NULL,
     psam_counter INTEGER NOT NULL,
     transaction_id TEXT NOT NULL,
     batch_number INTEGER NOT NULL,
     PRIMARY KEY (psam_id, psam_counter)
   );`,
];

/** Where a closed batch stands: in the outbox, or done with. */
export type BatchState = "pending" | "accepted" | "rejected" | "incomplete";

/** A closed batch as the store keeps it: its trailer, as CLOSE BATCH gave it, and what became of it. */
export interface StoredBatch {
  psam_id: string;
  batch_number: number;
  record_count: number;
  total_minor: number;
  currency: number;
  batch_mac: string;
  closed_at: string;
  state: BatchState;
  attempts: number;
  last_error: string;
  acknowledged_at: string | null;
  posted: number | null;
  quarantined: number | null;
  settlement_day: string | null;
}

/** A closed batch's summary, as CLOSE BATCH answers it. */
export interface ClosedBatchSummary {
  psamId: Buffer;
  batchNumber: number;
  count: number;
  total: number;
  currency: number;
  batchMac: Buffer;
}

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
  date_time: number;
  key_version: number;
  session_counter: number;
  challenge: string;
  balance_after: number;
  card_signature: string;
  record_mac: string;
}

const INSERT_TRANSACTION = `INSERT INTO psam_transactions (psam_id, psam_counter, batch_number, transaction_id, purse_id, card_counter, amount_minor, currency,
     merchant_id, date_time, card_signature, record_mac, key_version, session_counter, challenge, balance_after, job_id, recorded_at)
   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
   ON CONFLICT (psam_id, psam_counter) DO UPDATE SET key_version = excluded.key_version, session_counter = excluded.session_counter,
     challenge = excluded.challenge, balance_after = excluded.balance_after, card_signature = excluded.card_signature, record_mac = excluded.record_mac`;

function transactionRow(psamId: string, batchNumber: number, r: PsamBatchRecord, jobId: string): SqlValue[] {
  return [
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
    r.keyVersion,
    r.sessionCounter,
    r.challenge.toString("hex"),
    r.balanceAfter,
    jobId,
    new Date().toISOString(),
  ];
}

/** Owners of the latest claims kept in memory: every job's answer lists its PSAM's open debits with their owners. */
const OWNERS_KEPT = 4_096;

export class TerminalStore {
  constructor(private readonly db: Db) {}

  /** The latest claims, by transaction (a claim is never changed once made). */
  private readonly owners = new BoundedMap<string, string>(OWNERS_KEPT);

  async recordTransaction(psamId: string, batchNumber: number, r: PsamBatchRecord, jobId: string): Promise<void> {
    // A retried job finds the row there already: record it once (what the PSAM says of it is rewritten, the same bytes again, or the
    // card's session a row from before the session was kept lacks).
    await this.db.run(INSERT_TRANSACTION, transactionRow(psamId, batchNumber, r, jobId));
  }

  /** Records a batch's records in one transaction (before CLOSE BATCH: once it answers, the PSAM no longer holds them). */
  async recordTransactions(psamId: string, batchNumber: number, records: PsamBatchRecord[], jobId: string): Promise<void> {
    await this.db.transaction(async (tx) => {
      for (const r of records) await tx.run(INSERT_TRANSACTION, transactionRow(psamId, batchNumber, r, jobId));
    });
  }

  /** How many records of a batch the store holds, and their total. */
  async batchTally(psamId: string, batchNumber: number): Promise<{ count: number; total: number }> {
    const r = await this.db.get<{ count: number; total: number | null }>(
      "SELECT COUNT(*) AS count, SUM(amount_minor) AS total FROM psam_transactions WHERE psam_id = ? AND batch_number = ?",
      [psamId, batchNumber],
    );
    return { count: r?.count ?? 0, total: r?.total ?? 0 };
  }

  /** A batch's records, by PSAM counter. */
  batchRecords(psamId: string, batchNumber: number): Promise<StoredTransaction[]> {
    return this.db.all<StoredTransaction>("SELECT * FROM psam_transactions WHERE psam_id = ? AND batch_number = ? ORDER BY psam_counter", [
      psamId,
      batchNumber,
    ]);
  }

  async recordReversal(psamId: string, psamCounter: number, transactionId: string, reason: string): Promise<void> {
    await this.db.run(
      "INSERT INTO psam_reversals (psam_id, psam_counter, transaction_id, reason, reversed_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (psam_id, psam_counter) DO NOTHING",
      [psamId, psamCounter, transactionId, reason, new Date().toISOString()],
    );
  }

  /**
   * Puts a closed batch into the outbox ('pending'), or as `state` when it
   * cannot be sent; a batch the store already holds keeps its row (a second
   * copy from the PSAM's last closed summary changes nothing). True when the
   * row is new.
   */
  async recordBatch(b: ClosedBatchSummary, state: "pending" | "incomplete" = "pending", why = ""): Promise<boolean> {
    const r = await this.db.run(
      `INSERT INTO psam_batches (psam_id, batch_number, record_count, total_minor, currency, batch_mac, closed_at, state, last_error)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`,
      [b.psamId.toString("hex"), b.batchNumber, b.count, b.total, b.currency, b.batchMac.toString("hex"), new Date().toISOString(), state, why],
    );
    return r.changes === 1;
  }

  /** One closed batch, if the store holds it. */
  batch(psamId: string, batchNumber: number): Promise<StoredBatch | undefined> {
    return this.db.get<StoredBatch>("SELECT * FROM psam_batches WHERE psam_id = ? AND batch_number = ?", [psamId, batchNumber]);
  }

  /** Every closed batch the store holds, oldest first. */
  batches(): Promise<StoredBatch[]> {
    return this.db.all<StoredBatch>("SELECT * FROM psam_batches ORDER BY closed_at, psam_id, batch_number");
  }

  /** The outbox: closed batches clearing has not acknowledged, oldest first (by PSAM, lower batch numbers first). */
  outbox(): Promise<StoredBatch[]> {
    return this.db.all<StoredBatch>("SELECT * FROM psam_batches WHERE state = 'pending' ORDER BY closed_at, psam_id, batch_number");
  }

  /** Counts a failed attempt to send a batch, with why. */
  async noteAttempt(psamId: string, batchNumber: number, error: string): Promise<void> {
    await this.db.run("UPDATE psam_batches SET attempts = attempts + 1, last_error = ? WHERE psam_id = ? AND batch_number = ?", [error, psamId, batchNumber]);
  }

  /**
   * Clearing accepted the batch: its records leave the outbox, and of each
   * only its PSAM counter and transaction id stay (for settledTransaction),
   * in the same transaction as the batch's acknowledgement.
   */
  async acknowledge(psamId: string, batchNumber: number, ack: { posted: number; quarantined: number; settlementDay: string }): Promise<void> {
    await this.db.transaction(async (tx) => {
      await tx.run(
        `INSERT INTO cleared_debits (psam_id, psam_counter, transaction_id, batch_number)
         SELECT psam_id, psam_counter, transaction_id, batch_number FROM psam_transactions WHERE psam_id = ? AND batch_number = ?
         ON CONFLICT DO NOTHING`,
        [psamId, batchNumber],
      );
      await tx.run("DELETE FROM psam_transactions WHERE psam_id = ? AND batch_number = ?", [psamId, batchNumber]);
      // The PSAM answers again only for its last 1,024 settled debits: mappings far older than those are never asked for.
      await tx.run(`DELETE FROM cleared_debits WHERE psam_id = ? AND psam_counter < (SELECT MAX(psam_counter) FROM cleared_debits WHERE psam_id = ?) - ?`, [
        psamId,
        psamId,
        CLEARED_DEBITS_KEPT,
      ]);
      await tx.run(
        `UPDATE psam_batches SET state = 'accepted', attempts = attempts + 1, last_error = '', acknowledged_at = ?, posted = ?, quarantined = ?, settlement_day = ?
         WHERE psam_id = ? AND batch_number = ?`,
        [new Date().toISOString(), ack.posted, ack.quarantined, ack.settlementDay, psamId, batchNumber],
      );
    });
  }

  /** The batch is not to be sent (again): clearing rejected it, or the host cannot send it whole. Its records stay, for the operator. */
  async setAside(psamId: string, batchNumber: number, state: "rejected" | "incomplete", why: string): Promise<void> {
    await this.db.run("UPDATE psam_batches SET state = ?, last_error = ? WHERE psam_id = ? AND batch_number = ?", [state, why, psamId, batchNumber]);
  }

  /**
   * Records that `paymentServerId` asks for a DEBIT command for this
   * transaction; false when another payment server already did.
   */
  /**
   * Records the payment server a transaction's DEBIT command is issued for,
   * unless another was recorded first: whether this one may have it, as
   * soon as that is decided, and when the claim is on disk (before the
   * command may leave the host).
   */
  async claim(transactionId: string, paymentServerId: string): Promise<{ granted: boolean; synced: Promise<void> }> {
    const { value, synced } = await this.db.transactionBeforeSync(async (tx) => {
      await tx.run("INSERT INTO debit_owners (transaction_id, payment_server_id, claimed_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", [
        transactionId,
        paymentServerId,
        new Date().toISOString(),
      ]);
      return tx.get<{ payment_server_id: string }>("SELECT payment_server_id FROM debit_owners WHERE transaction_id = ?", [transactionId]);
    });
    if (value) this.owners.set(transactionId, value.payment_server_id);
    return { granted: value?.payment_server_id === paymentServerId, synced };
  }

  /** The payment server a transaction's DEBIT command was issued for; undefined when none was recorded. */
  async ownerOf(transactionId: string): Promise<string | undefined> {
    const kept = this.owners.get(transactionId);
    if (kept !== undefined) return kept;
    const owner = (await this.db.get<{ payment_server_id: string }>("SELECT payment_server_id FROM debit_owners WHERE transaction_id = ?", [transactionId]))
      ?.payment_server_id;
    if (owner !== undefined) this.owners.set(transactionId, owner);
    return owner;
  }

  /** The transaction a PSAM counter's debit was recorded or reversed for, once it is no longer open in the PSAM. */
  async settledTransaction(psamId: string, psamCounter: number): Promise<string | undefined> {
    const row =
      (await this.db.get<{ transaction_id: string }>("SELECT transaction_id FROM psam_transactions WHERE psam_id = ? AND psam_counter = ?", [
        psamId,
        psamCounter,
      ])) ??
      (await this.db.get<{ transaction_id: string }>("SELECT transaction_id FROM cleared_debits WHERE psam_id = ? AND psam_counter = ?", [
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

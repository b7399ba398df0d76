// The payment server's transaction database (database 223 of WO 98/49658):
// one row per transaction with its current state, and every step logged as
// an event, each written before the server answers.

import type { Db, Queryable, SqlValue } from "../../lib/store/db.js";

export const PAYMENT_MIGRATIONS = [
  `CREATE TABLE purchases (
     transaction_id TEXT PRIMARY KEY,
     request_hash TEXT NOT NULL,
     merchant_id TEXT NOT NULL,
     amount_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     exponent INTEGER NOT NULL,
     purse_id TEXT NOT NULL,
     card_counter INTEGER NOT NULL,
     key_version INTEGER NOT NULL,
     confirmation_mode INTEGER NOT NULL,
     state TEXT NOT NULL,
     terminal_id TEXT,
     psam_id TEXT,
     psam_counter INTEGER,
     debit_command BLOB,
     completion_hash TEXT,
     card_status_word INTEGER,
     debit_response BLOB,
     new_balance INTEGER,
     confirmation BLOB,
     error_code INTEGER,
     error_reason INTEGER,
     error_message TEXT,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );
   CREATE INDEX purchases_state ON purchases (state);
   CREATE INDEX purchases_psam ON purchases (psam_id, psam_counter);
   CREATE TABLE purchase_events (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     transaction_id TEXT NOT NULL REFERENCES purchases (transaction_id),
     at TEXT NOT NULL,
     step TEXT NOT NULL,
     detail TEXT NOT NULL
   );
   CREATE INDEX purchase_events_txn ON purchase_events (transaction_id, id);`,
  `ALTER TABLE purchases ADD COLUMN completion_token BLOB;`,
  `ALTER TABLE purchases ADD COLUMN key_nonce BLOB;
   ALTER TABLE purchases ADD COLUMN encrypted_session_key BLOB;
   ALTER TABLE purchases ADD COLUMN expected_card_signature BLOB;
   CREATE INDEX purchases_purse ON purchases (purse_id, card_counter);`,
];

/** States of a purchase, as stored (the PurchaseState names without their prefix). */
export type State = "RECEIVED" | "DEBIT_COMMAND_ISSUED" | "DEBIT_RESPONSE_RECEIVED" | "PROVEN" | "COMPLETED" | "REVERSED" | "REFUSED" | "IN_DOUBT";

export interface PurchaseRow {
  transaction_id: string;
  request_hash: string;
  merchant_id: string;
  amount_minor: number;
  currency: number;
  exponent: number;
  purse_id: string;
  card_counter: number;
  key_version: number;
  confirmation_mode: number;
  state: State;
  terminal_id: string | null;
  psam_id: string | null;
  psam_counter: number | null;
  debit_command: Buffer | null;
  completion_token: Buffer | null;
  completion_hash: string | null;
  card_status_word: number | null;
  debit_response: Buffer | null;
  new_balance: number | null;
  confirmation: Buffer | null;
  error_code: number | null;
  error_reason: number | null;
  error_message: string | null;
  key_nonce: Buffer | null;
  /** The ETSK as the offer carried it (an encoded Sealed); the TSK is recovered from it when needed, never stored. */
  encrypted_session_key: Buffer | null;
  /** Modes other than PSAM_VERIFIES: the card signature the PSAM expects. */
  expected_card_signature: Buffer | null;
  created_at: string;
  updated_at: string;
}

export interface EventRow {
  at: string;
  step: string;
  detail: string;
}

export type PurchasePatch = Partial<Omit<PurchaseRow, "transaction_id" | "created_at" | "updated_at">>;

export interface Step {
  step: string;
  detail: string;
}

async function logEvent(tx: Queryable, transactionId: string, e: Step, at: string): Promise<void> {
  await tx.run("INSERT INTO purchase_events (transaction_id, at, step, detail) VALUES (?, ?, ?, ?)", [transactionId, at, e.step, e.detail]);
}

export class PaymentStore {
  constructor(private readonly db: Db) {}

  /** Inserts a new purchase with its first event; false when the id exists already. */
  async insert(row: Omit<PurchaseRow, "created_at" | "updated_at">, event: Step): Promise<boolean> {
    const now = new Date().toISOString();
    return this.db.transaction(async (tx) => {
      const exists = await tx.get("SELECT 1 FROM purchases WHERE transaction_id = ?", [row.transaction_id]);
      if (exists) return false;
      const cols = Object.keys(row);
      await tx.run(`INSERT INTO purchases (${cols.join(", ")}, created_at, updated_at) VALUES (${cols.map(() => "?").join(", ")}, ?, ?)`, [
        ...(Object.values(row) as SqlValue[]),
        now,
        now,
      ]);
      await logEvent(tx, row.transaction_id, event, now);
      return true;
    });
  }

  /**
   * Moves a purchase to a new state (and other fields) with an event, only if
   * it is in one of `from`; false when it was not (someone else moved it).
   */
  async transition(transactionId: string, from: State[], patch: PurchasePatch, event: Step): Promise<boolean> {
    const now = new Date().toISOString();
    return this.db.transaction(async (tx) => {
      const sets = Object.keys(patch).map((k) => `${k} = ?`);
      const r = await tx.run(
        `UPDATE purchases SET ${[...sets, "updated_at = ?"].join(", ")} WHERE transaction_id = ? AND state IN (${from.map(() => "?").join(", ")})`,
        [...(Object.values(patch) as SqlValue[]), now, transactionId, ...from],
      );
      if (r.changes !== 1) return false;
      await logEvent(tx, transactionId, event, now);
      return true;
    });
  }

  /** Logs a step without changing the state. */
  async log(transactionId: string, event: Step): Promise<void> {
    await this.db.transaction((tx) => logEvent(tx, transactionId, event, new Date().toISOString()));
  }

  get(transactionId: string): Promise<PurchaseRow | undefined> {
    return this.db.get<PurchaseRow>("SELECT * FROM purchases WHERE transaction_id = ?", [transactionId]);
  }

  events(transactionId: string): Promise<EventRow[]> {
    return this.db.all<EventRow>("SELECT at, step, detail FROM purchase_events WHERE transaction_id = ? ORDER BY id", [transactionId]);
  }

  inStates(states: State[]): Promise<PurchaseRow[]> {
    return this.db.all<PurchaseRow>(`SELECT * FROM purchases WHERE state IN (${states.map(() => "?").join(", ")}) ORDER BY created_at`, states);
  }

  /** Rows not changed since `before` (ISO time), in the given states. */
  staleInStates(states: State[], before: string): Promise<PurchaseRow[]> {
    return this.db.all<PurchaseRow>(`SELECT * FROM purchases WHERE state IN (${states.map(() => "?").join(", ")}) AND updated_at < ? ORDER BY created_at`, [
      ...states,
      before,
    ]);
  }

  /** The purse's other purchases made at the same card counter. */
  sameCardCounter(purseId: string, cardCounter: number, exceptTransactionId: string): Promise<PurchaseRow[]> {
    return this.db.all<PurchaseRow>("SELECT * FROM purchases WHERE purse_id = ? AND card_counter = ? AND transaction_id <> ?", [
      purseId,
      cardCounter,
      exceptTransactionId,
    ]);
  }

  onPsam(psamId: string, states: State[]): Promise<PurchaseRow[]> {
    return this.db.all<PurchaseRow>(`SELECT * FROM purchases WHERE psam_id = ? AND state IN (${states.map(() => "?").join(", ")})`, [psamId, ...states]);
  }
}

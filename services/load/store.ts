// The load server's database: one row per load with its state, and every
// step logged as an event, each written before the server answers (step 887).

import type { Db, Queryable } from "../../lib/store/db.js";

export const LOAD_MIGRATIONS = [
  `CREATE TABLE loads (
     transaction_id TEXT PRIMARY KEY,
     bank_id TEXT NOT NULL,
     purse_id TEXT NOT NULL,
     amount_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     exponent INTEGER NOT NULL,
     key_nonce BLOB NOT NULL,
     authorised BLOB NOT NULL,
     initialize_response BLOB NOT NULL,
     hsm_id TEXT,
     hsm_counter INTEGER,
     load_command BLOB,
     state TEXT NOT NULL,
     outcome TEXT,
     proof TEXT,
     card_counter INTEGER,
     card_signature BLOB,
     settled_at TEXT,
     created_at TEXT NOT NULL
   );
   CREATE INDEX loads_purse ON loads (purse_id, state);
   CREATE TABLE load_events (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     transaction_id TEXT NOT NULL,
     at TEXT NOT NULL,
     step TEXT NOT NULL,
     detail TEXT NOT NULL
   );
   CREATE INDEX load_events_txn ON load_events (transaction_id, id);`,
  `ALTER TABLE loads ADD COLUMN proof_reference TEXT;`,
];

export type LoadRowState = "PENDING" | "SETTLED";
export type Outcome = "LOADED" | "NOT_LOADED";

export interface LoadRow {
  transaction_id: string;
  bank_id: string;
  purse_id: string;
  amount_minor: number;
  currency: number;
  exponent: number;
  key_nonce: Buffer;
  /** The INITIALIZE FOR LOAD command data the bank's authorisation stands for. */
  authorised: Buffer;
  initialize_response: Buffer;
  hsm_id: string | null;
  hsm_counter: number | null;
  load_command: Buffer | null;
  /** The transaction reference a zero-value INITIALIZE FOR LOAD must carry: made with the LOAD command. */
  proof_reference: string | null;
  state: LoadRowState;
  outcome: Outcome | null;
  proof: string | null;
  card_counter: number | null;
  card_signature: Buffer | null;
  settled_at: string | null;
}

export interface Settlement {
  outcome: Outcome;
  proof: string;
  cardCounter: number;
  cardSignature?: Buffer;
}

export class LoadStore {
  constructor(readonly db: Db) {}

  get(id: string, q: Queryable = this.db): Promise<LoadRow | undefined> {
    return q.get<LoadRow>("SELECT * FROM loads WHERE transaction_id = ?", [id]);
  }

  /** The loads of a card, pending or settled, whose transaction ids are in `ids`. */
  async ofPurse(purseId: string, ids: string[]): Promise<LoadRow[]> {
    if (!ids.length) return [];
    return this.db.all<LoadRow>(`SELECT * FROM loads WHERE purse_id = ? AND transaction_id IN (${ids.map(() => "?").join(", ")})`, [purseId, ...ids]);
  }

  event(q: Queryable, id: string, step: string, detail: string): Promise<unknown> {
    return q.run("INSERT INTO load_events (transaction_id, at, step, detail) VALUES (?, ?, ?, ?)", [id, new Date().toISOString(), step, detail]);
  }

  /** A new load, pending with its LOAD command, or settled at once (the security module refused it). */
  async insert(
    row: Omit<LoadRow, "outcome" | "proof" | "card_counter" | "card_signature" | "settled_at"> & { settlement?: Settlement },
    step: string,
    detail: string,
  ): Promise<void> {
    const s = row.settlement;
    await this.db.transaction(async (tx) => {
      await tx.run(
        `INSERT INTO loads (transaction_id, bank_id, purse_id, amount_minor, currency, exponent, key_nonce, authorised, initialize_response,
                            hsm_id, hsm_counter, load_command, proof_reference, state, outcome, proof, card_counter, card_signature, settled_at, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
        [
          row.transaction_id,
          row.bank_id,
          row.purse_id,
          row.amount_minor,
          row.currency,
          row.exponent,
          row.key_nonce,
          row.authorised,
          row.initialize_response,
          row.hsm_id,
          row.hsm_counter,
          row.load_command,
          row.proof_reference,
          row.state,
          s?.outcome ?? null,
          s?.proof ?? null,
          s?.cardCounter ?? null,
          s?.cardSignature ?? null,
          s ? new Date().toISOString() : null,
          new Date().toISOString(),
        ],
      );
      await this.event(tx, row.transaction_id, step, detail);
    });
  }

  /** Settles a pending load; false when it was no longer pending. */
  async settle(id: string, s: Settlement): Promise<boolean> {
    return this.db.transaction(async (tx) => {
      const r = await tx.run(
        "UPDATE loads SET state = 'SETTLED', outcome = ?, proof = ?, card_counter = ?, card_signature = ?, settled_at = ? WHERE transaction_id = ? AND state = 'PENDING'",
        [s.outcome, s.proof, s.cardCounter, s.cardSignature ?? null, new Date().toISOString(), id],
      );
      if (r.changes) await this.event(tx, id, s.outcome === "LOADED" ? "loaded" : "not_loaded", s.proof);
      return r.changes === 1;
    });
  }
}

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
  // Clearing (issue #11): what proves each settled load, as a kind clearing can check, and the outbox of
  // loads to report. Loads settled before this migration are named from their proof text and queued too:
  // clearing's float and the card balances it audits need every load the card took.
  `ALTER TABLE loads ADD COLUMN proof_kind TEXT;
   UPDATE loads SET proof_kind = CASE
       WHEN proof = 'S3 verified' THEN 'S3'
       WHEN proof LIKE 'card history:%' THEN 'CARD_HISTORY'
       WHEN proof LIKE 'negative result proven:%' THEN 'NEGATIVE_RESULT'
       WHEN proof LIKE 'negative result not proven:%' THEN 'NEGATIVE_RESULT_UNPROVEN'
       WHEN proof LIKE 'security module refused:%' THEN 'REFUSED'
       WHEN proof LIKE 'abandoned%' THEN 'ABANDONED'
     END
     WHERE state = 'SETTLED';
   CREATE TABLE clearing_outbox (
     seq INTEGER PRIMARY KEY AUTOINCREMENT,
     transaction_id TEXT NOT NULL UNIQUE REFERENCES loads (transaction_id),
     queued_at TEXT NOT NULL,
     attempts INTEGER NOT NULL,
     last_error TEXT,
     reported_at TEXT,
     clearing_status TEXT,
     duplicate INTEGER,
     settlement_day TEXT,
     refused_at TEXT
   );
   CREATE INDEX clearing_outbox_waiting ON clearing_outbox (seq) WHERE reported_at IS NULL AND refused_at IS NULL;
   INSERT INTO clearing_outbox (transaction_id, queued_at, attempts)
     SELECT transaction_id, settled_at, 0 FROM loads WHERE state = 'SETTLED' AND load_command IS NOT NULL ORDER BY settled_at, transaction_id;`,
];

export type LoadRowState = "PENDING" | "SETTLED";
export type Outcome = "LOADED" | "NOT_LOADED";

/**
 * What proves a settled load: the card's S3 (from its LOAD answer or its
 * log), the security module's verdict on a zero-value answer (proven, or
 * not and so treated as loaded), or, for a load that never had a LOAD
 * command, the module's refusal or the bank's abandonment.
 */
export type ProofKind = "S3" | "CARD_HISTORY" | "NEGATIVE_RESULT" | "NEGATIVE_RESULT_UNPROVEN" | "REFUSED" | "ABANDONED";

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
  proof_kind: ProofKind | null;
  card_counter: number | null;
  card_signature: Buffer | null;
  settled_at: string | null;
}

export interface Settlement {
  outcome: Outcome;
  kind: ProofKind;
  proof: string;
  cardCounter: number;
  cardSignature?: Buffer;
}

/** A settled load waiting in the outbox for clearing's acknowledgement. */
export type UnreportedLoad = LoadRow & { attempts: number };

/** A load's entry in the outbox to clearing. */
export interface ClearingReport {
  /** The outbox's order: the order the loads were settled in. */
  seq: number;
  transaction_id: string;
  queued_at: string;
  attempts: number;
  last_error: string | null;
  /** When clearing acknowledged the load; null while it waits. */
  reported_at: string | null;
  /** What clearing made of it: POSTED, NOT_LOADED or QUARANTINED. */
  clearing_status: string | null;
  /** 1 when clearing already held the load when it acknowledged it. */
  duplicate: number | null;
  settlement_day: string | null;
  /** When the load was set aside: clearing refused it (ALREADY_EXISTS, INVALID_ARGUMENT), or no record could be made of it. It is not sent again. */
  refused_at: string | null;
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
    row: Omit<LoadRow, "outcome" | "proof" | "proof_kind" | "card_counter" | "card_signature" | "settled_at"> & { settlement?: Settlement },
    step: string,
    detail: string,
  ): Promise<void> {
    const s = row.settlement;
    await this.db.transaction(async (tx) => {
      await tx.run(
        `INSERT INTO loads (transaction_id, bank_id, purse_id, amount_minor, currency, exponent, key_nonce, authorised, initialize_response,
                            hsm_id, hsm_counter, load_command, proof_reference, state, outcome, proof, proof_kind, card_counter, card_signature, settled_at,
                            created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
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
          s?.kind ?? null,
          s?.cardCounter ?? null,
          s?.cardSignature ?? null,
          s ? new Date().toISOString() : null,
          new Date().toISOString(),
        ],
      );
      await this.event(tx, row.transaction_id, step, detail);
    });
  }

  /**
   * Settles a pending load and queues it for clearing in the same
   * transaction, so that no crash can settle a load clearing never hears of;
   * false when it was no longer pending. (A load settled at its insert never
   * had a LOAD command: no card can hold its value, and clearing has nothing
   * to record.)
   */
  async settle(id: string, s: Settlement): Promise<boolean> {
    return this.db.transaction(async (tx) => {
      const now = new Date().toISOString();
      const r = await tx.run(
        "UPDATE loads SET state = 'SETTLED', outcome = ?, proof = ?, proof_kind = ?, card_counter = ?, card_signature = ?, settled_at = ? WHERE transaction_id = ? AND state = 'PENDING'",
        [s.outcome, s.proof, s.kind, s.cardCounter, s.cardSignature ?? null, now, id],
      );
      if (!r.changes) return false;
      await this.event(tx, id, s.outcome === "LOADED" ? "loaded" : "not_loaded", s.proof);
      await tx.run("INSERT INTO clearing_outbox (transaction_id, queued_at, attempts) VALUES (?, ?, 0)", [id, now]);
      return true;
    });
  }

  /** The oldest settled loads clearing has not acknowledged (nor refused), at most `limit`. */
  unreported(limit: number): Promise<UnreportedLoad[]> {
    return this.db.all<UnreportedLoad>(
      `SELECT l.*, o.attempts FROM clearing_outbox o JOIN loads l ON l.transaction_id = o.transaction_id
        WHERE o.reported_at IS NULL AND o.refused_at IS NULL ORDER BY o.seq LIMIT ?`,
      [limit],
    );
  }

  /** Clearing's acknowledgements, each with its load and event, in one transaction. */
  async reported(acks: { id: string; status: string; duplicate: boolean; settlementDay: string }[]): Promise<void> {
    await this.db.transaction(async (tx) => {
      const now = new Date().toISOString();
      for (const a of acks) {
        const r = await tx.run(
          `UPDATE clearing_outbox SET reported_at = ?, clearing_status = ?, duplicate = ?, settlement_day = ?, attempts = attempts + 1, last_error = NULL
            WHERE transaction_id = ? AND reported_at IS NULL`,
          [now, a.status, a.duplicate ? 1 : 0, a.settlementDay || null, a.id],
        );
        if (r.changes) {
          const day = a.settlementDay ? ` to settlement day ${a.settlementDay}` : "";
          await this.event(tx, a.id, "reported_to_clearing", `clearing: ${a.status}${day}${a.duplicate ? " (it already held the load)" : ""}`);
        }
      }
    });
  }

  /** A failed attempt to report these loads; they stay queued. */
  async attempted(ids: string[], error: string): Promise<void> {
    await this.db.transaction(async (tx) => {
      for (const id of ids) await tx.run("UPDATE clearing_outbox SET attempts = attempts + 1, last_error = ? WHERE transaction_id = ?", [error, id]);
    });
  }

  /** A load clearing refused (or that no record can be made of): out of the queue, with the reason, for the operator. */
  async setAside(id: string, error: string): Promise<void> {
    await this.db.transaction(async (tx) => {
      await tx.run("UPDATE clearing_outbox SET refused_at = ?, attempts = attempts + 1, last_error = ? WHERE transaction_id = ?", [
        new Date().toISOString(),
        error,
        id,
      ]);
      await this.event(tx, id, "clearing_set_aside", error);
    });
  }

  /** The outbox to clearing, oldest first (for tests and operators). */
  clearingReports(): Promise<ClearingReport[]> {
    return this.db.all<ClearingReport>("SELECT * FROM clearing_outbox ORDER BY seq");
  }
}

// The payment server's transaction database (database 223 of WO 98/49658):
// one row per transaction with its current state, and every step logged as
// an event, each written before the server answers. Rows are read back as a
// Purchase whose type says, per state, which fields it has; a row that breaks
// that is reported, never read with a guess.

import type { ConfirmationMode } from "../../gen/netpurse/card/v1/card.js";
import type { Db, Queryable, SqlValue } from "../../lib/store/db.js";
import { crashPoint } from "./crash-points.js";

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
  // Two columns no version ever wrote; and a proof that the card never made
  // a debit gets its own column instead of a made-up status word.
  `ALTER TABLE purchases DROP COLUMN completion_hash;
   ALTER TABLE purchases DROP COLUMN confirmation;
   ALTER TABLE purchases ADD COLUMN not_debited_proof TEXT;
   UPDATE purchases SET not_debited_proof = 'the card''s counter moved on through another proven transaction', card_status_word = NULL
     WHERE card_status_word = 28417;`,
  // The per-purse bound on DEBIT commands awaiting the card's answer counts a purse's purchases by state.
  `CREATE INDEX purchases_purse_state ON purchases (purse_id, state);`,
  // The card's balance at INITIALIZE FOR PURCHASE: the answer a PSAM predicted has that balance less the amount.
  `ALTER TABLE purchases ADD COLUMN card_balance INTEGER;`,
  // The per-purse bound counts the draw requests being worked on in the database, so that it holds across replicas:
  // one row per draw request between the count and its outcome, ignored once expired (a replica that died).
  `CREATE TABLE purse_draws (
     transaction_id TEXT PRIMARY KEY,
     purse_id TEXT NOT NULL,
     expires_at TEXT NOT NULL
   );
   CREATE INDEX purse_draws_purse ON purse_draws (purse_id);`,
];

/** States of a purchase, as stored (the PurchaseState names without their prefix). */
export type State = "RECEIVED" | "DEBIT_COMMAND_ISSUED" | "DEBIT_RESPONSE_RECEIVED" | "PROVEN" | "COMPLETED" | "REVERSED" | "REFUSED" | "IN_DOUBT";

/** What every purchase has from its draw request on. */
interface PurchaseBase {
  transaction_id: string;
  request_hash: string;
  merchant_id: string;
  amount_minor: number;
  currency: number;
  exponent: number;
  purse_id: string;
  card_counter: number;
  /** The card's balance before this purchase, as its INITIALIZE response gave it (null in rows from before it was kept). */
  card_balance: number | null;
  key_version: number;
  confirmation_mode: ConfirmationMode;
  /** Only the client that sent the draw request knows it: it binds CompletePurchase to that client. */
  completion_token: Buffer;
  key_nonce: Buffer;
  /** The ETSK as the offer carried it (an encoded Sealed); the TSK is recovered from it when needed, never stored. */
  encrypted_session_key: Buffer;
  created_at: string;
  updated_at: string;
}

/** A DEBIT command signed by a PSAM: from DEBIT_COMMAND_ISSUED on. */
export interface Signed {
  terminal_id: string;
  psam_id: string;
  psam_counter: number;
  debit_command: Buffer;
  /** Modes other than PSAM_VERIFIES: the card signature the PSAM expects. */
  expected_card_signature: Buffer | null;
}

/**
 * What is known of the card's answer to DEBIT: the card's own answer (its
 * status word and, with 9000, its 17 bytes), or a proof that the card never
 * made this debit (its log, or another proven transaction at its counter).
 */
export type CardAnswer = { kind: "card"; statusWord: number; debitResponse: Buffer } | { kind: "not_debited"; proof: string };

/** Why a purchase ended without a payment, as its caller was told. */
export interface Failure {
  code: number;
  reason: number;
  message: string;
}

export type Purchase = PurchaseBase &
  (
    | { state: "RECEIVED" }
    | { state: "REFUSED"; failure: Failure }
    | (Signed & { state: "DEBIT_COMMAND_ISSUED" })
    | (Signed & { state: "IN_DOUBT"; answer: CardAnswer | null })
    | (Signed & { state: "DEBIT_RESPONSE_RECEIVED"; answer: CardAnswer })
    | (Signed & { state: "PROVEN" | "COMPLETED"; answer: CardAnswer & { kind: "card" }; new_balance: number })
    | (Signed & { state: "REVERSED"; answer: CardAnswer | null; failure: Failure })
  );

export type SignedPurchase = Extract<Purchase, Signed>;
export type PaidPurchase = Extract<Purchase, { state: "PROVEN" | "COMPLETED" }>;

/** The columns of the purchases table. */
interface PurchaseRow {
  transaction_id: string;
  request_hash: string;
  merchant_id: string;
  amount_minor: number;
  currency: number;
  exponent: number;
  purse_id: string;
  card_counter: number;
  card_balance: number | null;
  key_version: number;
  confirmation_mode: number;
  state: State;
  terminal_id: string | null;
  psam_id: string | null;
  psam_counter: number | null;
  debit_command: Buffer | null;
  completion_token: Buffer | null;
  card_status_word: number | null;
  debit_response: Buffer | null;
  not_debited_proof: string | null;
  new_balance: number | null;
  error_code: number | null;
  error_reason: number | null;
  error_message: string | null;
  key_nonce: Buffer | null;
  encrypted_session_key: Buffer | null;
  expected_card_signature: Buffer | null;
  created_at: string;
  updated_at: string;
}

/** A stored row that does not have what its state requires: an operator must look. */
class CorruptPurchase extends Error {
  constructor(transactionId: string, problem: string) {
    super(`purchase ${transactionId} is inconsistent in the payment database: ${problem}`);
  }
}

function need<T>(row: PurchaseRow, value: T | null, column: string): T {
  if (value === null) throw new CorruptPurchase(row.transaction_id, `state ${row.state} without ${column}`);
  return value;
}

function answerOf(row: PurchaseRow): CardAnswer | null {
  if (row.not_debited_proof !== null) return { kind: "not_debited", proof: row.not_debited_proof };
  if (row.card_status_word === null) return null;
  return { kind: "card", statusWord: row.card_status_word, debitResponse: row.debit_response ?? Buffer.alloc(0) };
}

function failureOf(row: PurchaseRow): Failure {
  return { code: need(row, row.error_code, "error_code"), reason: row.error_reason ?? 0, message: row.error_message ?? `transaction ended ${row.state}` };
}

function toPurchase(row: PurchaseRow): Purchase {
  const base: PurchaseBase = {
    transaction_id: row.transaction_id,
    request_hash: row.request_hash,
    merchant_id: row.merchant_id,
    amount_minor: row.amount_minor,
    currency: row.currency,
    exponent: row.exponent,
    purse_id: row.purse_id,
    card_counter: row.card_counter,
    card_balance: row.card_balance,
    key_version: row.key_version,
    confirmation_mode: row.confirmation_mode,
    completion_token: need(row, row.completion_token, "completion_token"),
    key_nonce: need(row, row.key_nonce, "key_nonce"),
    encrypted_session_key: need(row, row.encrypted_session_key, "encrypted_session_key"),
    created_at: row.created_at,
    updated_at: row.updated_at,
  };
  if (row.state === "RECEIVED") return { ...base, state: row.state };
  if (row.state === "REFUSED") return { ...base, state: row.state, failure: failureOf(row) };
  const signed: Signed = {
    terminal_id: need(row, row.terminal_id, "terminal_id"),
    psam_id: need(row, row.psam_id, "psam_id"),
    psam_counter: need(row, row.psam_counter, "psam_counter"),
    debit_command: need(row, row.debit_command, "debit_command"),
    expected_card_signature: row.expected_card_signature,
  };
  switch (row.state) {
    case "DEBIT_COMMAND_ISSUED":
      return { ...base, ...signed, state: row.state };
    case "IN_DOUBT":
      return { ...base, ...signed, state: row.state, answer: answerOf(row) };
    case "DEBIT_RESPONSE_RECEIVED":
      return { ...base, ...signed, state: row.state, answer: need(row, answerOf(row), "card answer") };
    case "PROVEN":
    case "COMPLETED": {
      const answer = answerOf(row);
      if (answer?.kind !== "card" || answer.debitResponse.length === 0)
        throw new CorruptPurchase(row.transaction_id, `state ${row.state} without the card's answer`);
      return { ...base, ...signed, state: row.state, answer, new_balance: need(row, row.new_balance, "new_balance") };
    }
    case "REVERSED":
      return { ...base, ...signed, state: row.state, answer: answerOf(row), failure: failureOf(row) };
  }
}

export interface EventRow {
  at: string;
  step: string;
  detail: string;
}

/** Columns a transition may set. */
export type PurchasePatch = Partial<
  Pick<
    PurchaseRow,
    | "terminal_id"
    | "psam_id"
    | "psam_counter"
    | "debit_command"
    | "expected_card_signature"
    | "card_status_word"
    | "debit_response"
    | "not_debited_proof"
    | "new_balance"
    | "error_code"
    | "error_reason"
    | "error_message"
  >
> & { state: State };

/** The columns that record a card answer. */
export function answerColumns(a: CardAnswer): Omit<PurchasePatch, "state"> {
  return a.kind === "card"
    ? { card_status_word: a.statusWord, debit_response: a.debitResponse, not_debited_proof: null }
    : { card_status_word: null, debit_response: null, not_debited_proof: a.proof };
}

/** The columns that record why a purchase failed. */
export function failureColumns(f: Failure) {
  return { error_code: f.code, error_reason: f.reason, error_message: f.message };
}

/** A new purchase as the draw request makes it. */
export type NewPurchase = Omit<PurchaseBase, "created_at" | "updated_at">;

export interface Step {
  step: string;
  detail: string;
}

/** One step, or several recorded in the same commit (in their order). */
export type Steps = Step | readonly Step[];

const stepsOf = (e: Steps): readonly Step[] => ("step" in e ? [e] : e);

async function logEvents(tx: Queryable, transactionId: string, e: Steps, at: string): Promise<void> {
  for (const s of stepsOf(e)) {
    await tx.run("INSERT INTO purchase_events (transaction_id, at, step, detail) VALUES (?, ?, ?, ?)", [transactionId, at, s.step, s.detail]);
  }
}

/** The test-only crash points around a commit of `e` (crash-points.ts). */
function crashAround(when: "before" | "after", e: Steps): void {
  for (const s of stepsOf(e)) crashPoint(when, s.step);
}

const inList = (states: readonly State[]) => states.map(() => "?").join(", ");

/** The purse's purchases with a DEBIT command issued and no card answer recorded (awaitingCardAnswer). */
const AWAITING_CARD_ANSWER = `SELECT COUNT(*) AS n FROM purchases
  WHERE purse_id = ? AND state IN ('DEBIT_COMMAND_ISSUED', 'IN_DOUBT')
    AND card_status_word IS NULL AND not_debited_proof IS NULL`;

/** How long a step kept for a purchase's next write waits for one before it is written alone. */
const LATER_STEPS_MS = 1_000;

export class PaymentStore {
  /** `onCorrupt` hears of rows a listing leaves out because they break their state's shape. */
  constructor(
    private readonly db: Db,
    private readonly onCorrupt: (e: CorruptPurchase) => void = () => undefined,
  ) {}

  /**
   * Test only: awaited before each write of a purchase's steps (transition
   * and log), with the steps about to be written: a test stops a step there
   * (its connections cut, another replica acting meanwhile).
   */
  beforeWrite: ((transactionId: string, steps: readonly Step[]) => Promise<void>) | undefined;

  /** Steps no answer depends on, by transaction, waiting to go with its next write. */
  private readonly pending = new Map<string, { steps: Step[]; timer: NodeJS.Timeout }>();

  /**
   * Records a step no answer depends on (a measurement) with the purchase's
   * next write, in the same commit, or alone within a second: one commit
   * less on the purchase's path. A crash before then loses only it.
   */
  later(transactionId: string, step: Step): void {
    const kept = this.pending.get(transactionId);
    if (kept) {
      kept.steps.push(step);
      return;
    }
    const timer = setTimeout(() => {
      this.log(transactionId, []).catch(() => undefined); // a measurement: lost, not retried
    }, LATER_STEPS_MS);
    timer.unref();
    this.pending.set(transactionId, { steps: [step], timer });
  }

  private takeLater(transactionId: string): Step[] {
    const kept = this.pending.get(transactionId);
    if (!kept) return [];
    clearTimeout(kept.timer);
    this.pending.delete(transactionId);
    return kept.steps;
  }

  /**
   * The per-purse bound and what it lets in, in one transaction (so that it
   * holds across replicas sharing the database): counts the purse's
   * purchases awaiting the card's answer (awaitingCardAnswer) and its other
   * draw requests being worked on (their places in purse_draws, unexpired);
   * at `bound` or beyond, returns that count and writes nothing. Otherwise
   * it takes a place for this draw request until `until` (ISO time; given
   * back by the purchase's move out of RECEIVED, or by releaseDraw) and,
   * for a new purchase, inserts it (state RECEIVED) with its first event:
   * the purchase as stored; undefined when a new purchase's id exists already.
   */
  async reserveDraw(
    purseId: string,
    draw: { insert: NewPurchase; event: Step } | { retry: string },
    bound: number,
    until: string,
  ): Promise<Purchase | number | undefined> {
    const now = new Date().toISOString();
    const id = "insert" in draw ? draw.insert.transaction_id : draw.retry;
    if ("insert" in draw) crashAround("before", draw.event);
    const r = await this.db.transaction(
      async (tx): Promise<Purchase | number | undefined> => {
        await tx.run("DELETE FROM purse_draws WHERE purse_id = ? AND expires_at < ?", [purseId, now]);
        // One statement, so one snapshot: under READ COMMITTED, a purchase leaving RECEIVED between two statements (its place
        // given back and it now awaiting the card's answer, in one commit) would be counted in neither.
        const counted = await tx.get<{ waiting: number; drawing: number }>(
          `SELECT (${AWAITING_CARD_ANSWER}) AS waiting, (SELECT COUNT(*) FROM purse_draws WHERE purse_id = ? AND transaction_id <> ?) AS drawing`,
          [purseId, purseId, id],
        );
        const waiting = counted?.waiting ?? 0;
        const drawing = counted?.drawing ?? 0;
        if (waiting + drawing >= bound) return waiting + drawing;
        let p: Purchase | undefined;
        if ("insert" in draw) {
          if (await tx.get("SELECT 1 FROM purchases WHERE transaction_id = ?", [id])) return undefined;
          const row: Record<string, SqlValue> = { ...draw.insert, state: "RECEIVED", created_at: now, updated_at: now };
          const cols = Object.keys(row);
          const stored = await tx.get<PurchaseRow>(
            `INSERT INTO purchases (${cols.join(", ")}) VALUES (${cols.map(() => "?").join(", ")}) RETURNING *`,
            cols.map((c) => row[c] ?? null),
          );
          await logEvents(tx, id, draw.event, now);
          p = stored && toPurchase(stored);
        } else {
          // A new attempt: a RECEIVED row's age (the abandon bound) counts from it, so that no sweep ends a draw request being retried.
          const row =
            (await tx.get<PurchaseRow>("UPDATE purchases SET updated_at = ? WHERE transaction_id = ? AND state = 'RECEIVED' RETURNING *", [now, id])) ??
            (await tx.get<PurchaseRow>("SELECT * FROM purchases WHERE transaction_id = ?", [id]));
          p = row && toPurchase(row);
        }
        await tx.run("DELETE FROM purse_draws WHERE transaction_id = ?", [id]);
        await tx.run("INSERT INTO purse_draws (transaction_id, purse_id, expires_at) VALUES (?, ?, ?)", [id, purseId, until]);
        return p;
        // The purse's lock keeps its count and its new place together across replicas; the purchase's own id is its caller's lock.
      },
      { locks: [`purse:${purseId}`] },
    );
    if ("insert" in draw && typeof r === "object") crashAround("after", draw.event);
    return r;
  }

  /** Gives back a draw request's place under its purse's bound (a draw request that ended without leaving RECEIVED). */
  async releaseDraw(transactionId: string): Promise<void> {
    await this.db.run("DELETE FROM purse_draws WHERE transaction_id = ?", [transactionId]);
  }

  /** Drops the places of draw requests whose time ran out (their replica died before giving them back). */
  async dropExpiredDraws(): Promise<void> {
    await this.db.run("DELETE FROM purse_draws WHERE expires_at < ?", [new Date().toISOString()]);
  }

  /** The states of the given purchases, by transaction id (those that exist). */
  async states(transactionIds: readonly string[]): Promise<Map<string, State>> {
    if (transactionIds.length === 0) return new Map();
    const rows = await this.db.all<{ transaction_id: string; state: State }>(
      `SELECT transaction_id, state FROM purchases WHERE transaction_id IN (${transactionIds.map(() => "?").join(", ")})`,
      [...transactionIds],
    );
    return new Map(rows.map((r) => [r.transaction_id, r.state]));
  }

  /**
   * Moves a purchase to a new state (and other fields) with its events, only
   * if it is in one of `from`: the purchase as it now stands (no read after),
   * or undefined when it was not (someone else moved it).
   */
  async transition(transactionId: string, from: readonly State[], patch: PurchasePatch, step: Steps): Promise<Purchase | undefined> {
    const now = new Date().toISOString();
    const cols = Object.keys(patch) as (keyof PurchasePatch)[];
    const kept = this.takeLater(transactionId);
    const event = [...kept, ...stepsOf(step)];
    crashAround("before", event);
    if (this.beforeWrite) await this.beforeWrite(transactionId, event);
    const moved = await this.db.transaction(
      async (tx) => {
        const row = await tx.get<PurchaseRow>(
          `UPDATE purchases SET ${[...cols.map((k) => `${k} = ?`), "updated_at = ?"].join(", ")} WHERE transaction_id = ? AND state IN (${inList(from)}) RETURNING *`,
          [...cols.map((c) => patch[c] ?? null), now, transactionId, ...from],
        );
        if (!row) return undefined;
        await logEvents(tx, transactionId, event, now);
        // Out of RECEIVED, the draw request has its outcome: its place under the purse's bound goes with the same commit.
        if (from.includes("RECEIVED")) await tx.run("DELETE FROM purse_draws WHERE transaction_id = ?", [transactionId]);
        return toPurchase(row);
        // Kept apart by its conditional UPDATE (only from the states read), under the purchase's lock its caller holds.
      },
      { locks: [] },
    );
    if (moved) crashAround("after", event);
    else for (const s of kept) this.later(transactionId, s);
    return moved;
  }

  /** Logs steps (and those kept for the purchase's next write) without changing the state. */
  async log(transactionId: string, step: Steps): Promise<void> {
    const event = [...this.takeLater(transactionId), ...stepsOf(step)];
    if (event.length === 0) return;
    crashAround("before", event);
    if (this.beforeWrite) await this.beforeWrite(transactionId, event);
    await this.db.transaction((tx) => logEvents(tx, transactionId, event, new Date().toISOString()), { locks: [] });
    crashAround("after", event);
  }

  /** Whether the purchase's events hold this step, its detail the same. */
  async hasStep(transactionId: string, s: Step): Promise<boolean> {
    return (
      (await this.db.get("SELECT 1 AS x FROM purchase_events WHERE transaction_id = ? AND step = ? AND detail = ?", [transactionId, s.step, s.detail])) !==
      undefined
    );
  }

  /**
   * Logs a step unless the purchase's events hold it already, in one
   * transaction under a lock of the purchase's events (two replicas
   * reporting one fact at once log it once): whether it was logged.
   */
  async logOnce(transactionId: string, s: Step): Promise<boolean> {
    if (this.beforeWrite) await this.beforeWrite(transactionId, [s]);
    return this.db.transaction(
      async (tx) => {
        if (await tx.get("SELECT 1 AS x FROM purchase_events WHERE transaction_id = ? AND step = ? AND detail = ?", [transactionId, s.step, s.detail]))
          return false;
        await logEvents(tx, transactionId, s, new Date().toISOString());
        return true;
      },
      { locks: [`purchase-events:${transactionId}`] },
    );
  }

  async get(transactionId: string): Promise<Purchase | undefined> {
    const row = await this.db.get<PurchaseRow>("SELECT * FROM purchases WHERE transaction_id = ?", [transactionId]);
    return row && toPurchase(row);
  }

  /** A purchase that must exist (it was read or written a moment ago under the transaction's lock). */
  async require(transactionId: string): Promise<Purchase> {
    const p = await this.get(transactionId);
    if (!p) throw new CorruptPurchase(transactionId, "the record is gone");
    return p;
  }

  events(transactionId: string): Promise<EventRow[]> {
    return this.db.all<EventRow>("SELECT at, step, detail FROM purchase_events WHERE transaction_id = ? ORDER BY id", [transactionId]);
  }

  async inStates(states: readonly State[]): Promise<Purchase[]> {
    return this.list(`SELECT * FROM purchases WHERE state IN (${inList(states)}) ORDER BY created_at`, [...states]);
  }

  /** Purchases not changed since `before` (ISO time), in the given states. */
  async staleInStates(states: readonly State[], before: string): Promise<Purchase[]> {
    return this.list(`SELECT * FROM purchases WHERE state IN (${inList(states)}) AND updated_at < ? ORDER BY created_at`, [...states, before]);
  }

  /** The purse's other purchases made at the same card counter. */
  async sameCardCounter(purseId: string, cardCounter: number, exceptTransactionId: string): Promise<Purchase[]> {
    return this.list("SELECT * FROM purchases WHERE purse_id = ? AND card_counter = ? AND transaction_id <> ?", [purseId, cardCounter, exceptTransactionId]);
  }

  /**
   * How many of the purse's purchases have a DEBIT command issued and no card
   * answer recorded: DEBIT_COMMAND_ISSUED, and IN_DOUBT without an answer (or
   * a proof that the card never made the debit). Each may still hold an open
   * debit in its PSAM until the card's answer or log settles it.
   */
  async awaitingCardAnswer(purseId: string): Promise<number> {
    const row = await this.db.get<{ n: number }>(AWAITING_CARD_ANSWER, [purseId]);
    return row?.n ?? 0;
  }

  async onPsam(psamId: string, states: readonly State[]): Promise<Purchase[]> {
    return this.list(`SELECT * FROM purchases WHERE psam_id = ? AND state IN (${inList(states)})`, [psamId, ...states]);
  }

  /** The rows as purchases; one inconsistent row is reported and left out, so it cannot stop the work on all the others. */
  private async list(sql: string, params: SqlValue[]): Promise<Purchase[]> {
    const out: Purchase[] = [];
    for (const row of await this.db.all<PurchaseRow>(sql, params)) {
      try {
        out.push(toPurchase(row));
      } catch (e) {
        if (!(e instanceof CorruptPurchase)) throw e;
        this.onCorrupt(e);
      }
    }
    return out;
  }
}

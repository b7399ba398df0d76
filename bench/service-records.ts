// What the services wrote down during a run, read from their SQLite
// databases (readonly, so the benchmark cannot change the record): how long
// each purchase held its PSAM, which steps the payment server logged, where
// its purchases ended, and the merchant validation's outbox of card proofs.

import Database from "better-sqlite3";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { paths } from "../services/network/layout.js";
import { percentile } from "./load.js";

/** A PSAM lease as logged when it ended. */
export interface HoldSample {
  /** When the PSAM went back to the pool, ms since the epoch. */
  releasedAt: number;
  heldMs: number;
}

export interface HoldStats {
  /** Leases that ended inside the measuring window. */
  samples: number;
  p50Ms: number;
  p99Ms: number;
}

export interface PaymentRecords {
  holds: HoldSample[];
  /** Logged steps (purchase_events.step), by step. */
  events: Record<string, number>;
  /** Purchases by their final state. */
  states: Record<string, number>;
}

export interface ProofOutbox {
  /** Proofs by outbox state (QUEUED, ACKNOWLEDGED, REFUSED). */
  states: Record<string, number>;
  /** ReportCardSignature calls made, all proofs together. */
  attempts: number;
}

/** Steps of purchases that went as they should; any other step is worth a look. */
export const ROUTINE_STEPS = new Set([
  "draw_request_received",
  "psam_assigned",
  "debit_command_issued",
  "psam_released",
  "debit_response_received",
  "card_signature_matched",
  "card_signature_reported",
  "purchase_confirmed",
  "recorded_in_batch",
]);

/** The payment server's log line for a lease: "PSAM <id> held <n> ms: <why>". */
const HELD = /held (\d+) ms/;

function readDb<T>(file: string, read: (db: Database.Database) => T): T {
  const db = new Database(file, { readonly: true, fileMustExist: true });
  try {
    return read(db);
  } finally {
    db.close();
  }
}

function tally(rows: { key: string; n: number }[]): Record<string, number> {
  return Object.fromEntries(rows.map((r) => [r.key, r.n]));
}

/** The payment server's records of a data folder; read once it has stopped, so that every step is in. */
export function paymentRecords(dataDir: string): PaymentRecords {
  return readDb(join(paths(dataDir).payment, "payment.db"), (db) => {
    const released = db.prepare("SELECT at, detail FROM purchase_events WHERE step = 'psam_released'").all() as { at: string; detail: string }[];
    const holds = released.flatMap((r) => {
      const m = HELD.exec(r.detail);
      return m ? [{ releasedAt: Date.parse(r.at), heldMs: Number(m[1]) }] : [];
    });
    const events = tally(db.prepare("SELECT step AS key, COUNT(*) AS n FROM purchase_events GROUP BY step").all() as { key: string; n: number }[]);
    const states = tally(db.prepare("SELECT state AS key, COUNT(*) AS n FROM purchases GROUP BY state").all() as { key: string; n: number }[]);
    return { holds, events, states };
  });
}

/** Purchases by state, read while the payment server runs (WAL lets a reader in beside it). */
export function purchaseStates(dataDir: string): Record<string, number> {
  return readDb(join(paths(dataDir).payment, "payment.db"), (db) =>
    tally(db.prepare("SELECT state AS key, COUNT(*) AS n FROM purchases GROUP BY state").all() as { key: string; n: number }[]),
  );
}

/** Longest wait for each kind of work left after the load: the validation outbox retries every 10 s, the payment server's sweep every 15 s. */
export const BACKGROUND_DRAIN_MS = 15_000;

/**
 * Purchases whose card answer is in but not yet ruled on, or proven but not
 * yet in the PSAM's batch: the work an early-release mode leaves after the
 * purchase's answer. Read while the payment server runs.
 */
export function unrecordedPurchases(dataDir: string): number {
  return unrecordedIn(purchaseStates(dataDir));
}

/** Of purchases by state (the payment server's SQLite file or its PostgreSQL schema), those answered but not yet in their PSAM's batch. */
export const unrecordedIn = (states: Record<string, number>): number => (states.DEBIT_RESPONSE_RECEIVED ?? 0) + (states.PROVEN ?? 0);

/** Work a purchase left behind when the load ended, and how long the services took to finish it. */
export interface Backlog {
  /** Still pending when the load ended. */
  atEnd: number;
  /** Still pending when the benchmark stopped waiting. */
  left: number;
  /** How long the benchmark waited for it (after the work before it in the chain). */
  waitedMs: number;
}

/** Polls `pending` (a SQLite read, or a query to PostgreSQL) until it is 0, at most `timeoutMs`; `atEnd` is what it was when the load ended. */
export async function waitForBacklog(pending: () => number | Promise<number>, atEnd: number, timeoutMs: number): Promise<Backlog> {
  const started = performance.now();
  for (let left = await pending(); ; left = await pending()) {
    const waitedMs = performance.now() - started;
    if (left === 0 || waitedMs > timeoutMs) return { atEnd, left, waitedMs };
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** The merchant validation's outbox of card proofs (MERCHANT_COMPARES); readable while the service runs (WAL). */
export function proofOutbox(dataDir: string): ProofOutbox {
  const file = join(paths(dataDir).validation, "validation.db");
  if (!existsSync(file)) return { states: {}, attempts: 0 };
  return readDb(file, (db) => ({
    states: tally(db.prepare("SELECT state AS key, COUNT(*) AS n FROM proof_outbox GROUP BY state").all() as { key: string; n: number }[]),
    attempts: (db.prepare("SELECT COALESCE(SUM(attempts), 0) AS n FROM proof_outbox").get() as { n: number }).n,
  }));
}

/** Percentiles of the leases that ended inside [from, to] (ms since the epoch), as latency counts the purchases that ended in the window. */
export function holdStats(holds: HoldSample[], from: number, to: number): HoldStats {
  const inWindow = holds
    .filter((h) => h.releasedAt >= from && h.releasedAt <= to)
    .map((h) => h.heldMs)
    .sort((a, b) => a - b);
  return { samples: inWindow.length, p50Ms: percentile(inWindow, 0.5), p99Ms: percentile(inWindow, 0.99) };
}

/** Records the wall-clock times the measuring window opened and closed, to match service records against it. */
export class WallClockWindow {
  openedAt = NaN;
  closedAt = NaN;

  opened(): void {
    this.openedAt = Date.now();
  }

  closed(): void {
    this.closedAt = Date.now();
  }
}

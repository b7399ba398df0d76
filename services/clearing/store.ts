// Clearing's database: the batches it accepted or rejected, what it
// quarantined, and a double-entry ledger. Every posting is one purchase or
// one load, keyed by its kind and transaction id and posted once, whose
// entries sum to zero in its currency. Purchases and loads have ids of their
// own making (the merchant's, the cardholder's client's): one kind's id never
// blocks the other's. Entries are signed minor units: positive a debit, negative a
// credit. Accounts:
//   issuer:<id>:float         the value outstanding on the issuer's cards (credit balance)
//   merchant:<id>:payable     what the merchant is owed through its acquirer (credit balance)
//   bank:<id>:settlement      what the bank owes for its account holders' loads (debit balance)
// A load: debit the bank, credit the issuer's float. A proven purchase:
// debit the issuer's float, credit the merchant.
//
// Loyalty points are not money: a proven points redemption (a record of a
// programme's points batch) goes to a ledger of its own, the tables
// redemptions and points_entries, in points of its programme, never to an
// account above. Accounts, per programme P (its code):
//   points:<P>:cards                   the points taken off the programme's cards (debit balance)
//   points:<P>:redeemed:<merchant>     the points a merchant (a benefits site) took, which the programme honours (credit balance)
// A redemption of N points: debit points:<P>:cards, credit points:<P>:redeemed:<merchant>.
// Each redemption's two entries sum to zero, so each programme's ledger does.

import type { Db, Queryable } from "../../lib/store/db.js";

export const CLEARING_MIGRATIONS = [
  `CREATE TABLE settlement_days (
     day TEXT PRIMARY KEY,
     closed_at TEXT NOT NULL
   );
   CREATE TABLE batches (
     psam_id TEXT NOT NULL,
     batch_number INTEGER NOT NULL,
     terminal_id TEXT NOT NULL,
     record_count INTEGER NOT NULL,
     total_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     batch_mac TEXT NOT NULL,
     closed_at TEXT,
     posted INTEGER NOT NULL,
     quarantined INTEGER NOT NULL,
     settlement_day TEXT NOT NULL,
     received_at TEXT NOT NULL,
     resubmissions INTEGER NOT NULL DEFAULT 0,
     PRIMARY KEY (psam_id, batch_number, batch_mac)
   );
   CREATE TABLE quarantine (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     kind TEXT NOT NULL CHECK (kind IN ('record', 'load', 'batch')),
     psam_id TEXT,
     batch_number INTEGER,
     psam_counter INTEGER,
     transaction_id TEXT,
     terminal_id TEXT,
     reason TEXT NOT NULL,
     content BLOB NOT NULL,
     digest TEXT NOT NULL,
     quarantined_at TEXT NOT NULL,
     resolved_at TEXT
   );
   CREATE INDEX quarantine_batch ON quarantine (psam_id, batch_number, psam_counter);
   CREATE UNIQUE INDEX quarantine_once ON quarantine (kind, digest);
   CREATE TABLE postings (
     seq INTEGER PRIMARY KEY AUTOINCREMENT,
     kind TEXT NOT NULL CHECK (kind IN ('purchase', 'load')),
     transaction_id TEXT NOT NULL,
     settlement_day TEXT NOT NULL,
     posted_at TEXT NOT NULL,
     UNIQUE (kind, transaction_id)
   );
   CREATE TABLE ledger_entries (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     posting_seq INTEGER NOT NULL REFERENCES postings (seq),
     account TEXT NOT NULL,
     amount_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     settlement_day TEXT NOT NULL
   );
   CREATE INDEX ledger_posting ON ledger_entries (posting_seq);
   CREATE INDEX ledger_day ON ledger_entries (settlement_day, account);
   CREATE TABLE purchases (
     transaction_id TEXT PRIMARY KEY,
     psam_id TEXT NOT NULL,
     psam_counter INTEGER NOT NULL,
     batch_number INTEGER NOT NULL,
     purse_id TEXT NOT NULL,
     merchant_id TEXT NOT NULL,
     acquirer_id TEXT NOT NULL,
     issuer_id TEXT NOT NULL,
     amount_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     exponent INTEGER NOT NULL,
     settlement_day TEXT NOT NULL,
     posted_at TEXT NOT NULL,
     UNIQUE (psam_id, psam_counter)
   );
   CREATE INDEX purchases_merchant ON purchases (merchant_id, settlement_day);
   CREATE INDEX purchases_purse ON purchases (purse_id);
   CREATE TABLE loads (
     transaction_id TEXT PRIMARY KEY,
     bank_id TEXT NOT NULL,
     purse_id TEXT NOT NULL,
     issuer_id TEXT NOT NULL,
     amount_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     exponent INTEGER NOT NULL,
     outcome TEXT NOT NULL,
     proof TEXT NOT NULL,
     status TEXT NOT NULL CHECK (status IN ('POSTED', 'NOT_LOADED', 'QUARANTINED')),
     reason TEXT,
     digest TEXT NOT NULL,
     settlement_day TEXT,
     recorded_at TEXT NOT NULL
   );
   CREATE INDEX loads_purse ON loads (purse_id);`,
  // Issue #14: loyalty points, a ledger apart from money.
  `CREATE TABLE redemptions (
     seq INTEGER PRIMARY KEY AUTOINCREMENT,
     transaction_id TEXT NOT NULL UNIQUE,
     psam_id TEXT NOT NULL,
     psam_counter INTEGER NOT NULL,
     batch_number INTEGER NOT NULL,
     purse_id TEXT NOT NULL,
     merchant_id TEXT NOT NULL,
     programme INTEGER NOT NULL CHECK (programme BETWEEN 1000 AND 65535),
     points INTEGER NOT NULL,
     settlement_day TEXT NOT NULL,
     posted_at TEXT NOT NULL,
     UNIQUE (psam_id, psam_counter)
   );
   CREATE INDEX redemptions_day ON redemptions (settlement_day, programme, merchant_id);
   CREATE TABLE points_entries (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     redemption_seq INTEGER NOT NULL REFERENCES redemptions (seq),
     account TEXT NOT NULL CHECK (account LIKE 'points:%'),
     programme INTEGER NOT NULL,
     points INTEGER NOT NULL,
     settlement_day TEXT NOT NULL
   );
   CREATE INDEX points_entries_redemption ON points_entries (redemption_seq);`,
  // Issue #15: the batches under one PSAM's batch number in the order clearing accepted them, without SQLite's rowid
  // (PostgreSQL has none): numbered by the insert (the number's highest plus one, in the submission's transaction).
  // Batches accepted before are numbered by when they were received.
  `ALTER TABLE batches ADD COLUMN seq INTEGER;
   UPDATE batches SET seq = (SELECT n FROM (SELECT psam_id, batch_number, batch_mac,
                                                   ROW_NUMBER() OVER (PARTITION BY psam_id, batch_number ORDER BY received_at, batch_mac) AS n
                                              FROM batches) AS ranked
                              WHERE ranked.psam_id = batches.psam_id AND ranked.batch_number = batches.batch_number AND ranked.batch_mac = batches.batch_mac);
   CREATE UNIQUE INDEX batches_seq ON batches (psam_id, batch_number, seq);`,
];

export const account = {
  float: (issuerId: string) => `issuer:${issuerId}:float`,
  payable: (merchantId: string) => `merchant:${merchantId}:payable`,
  bank: (bankId: string) => `bank:${bankId}:settlement`,
  /** The points a programme's cards gave up (points ledger). */
  pointsCards: (programme: number) => `points:${programme}:cards`,
  /** The points a merchant took in a programme (points ledger). */
  pointsRedeemed: (programme: number, merchantId: string) => `points:${programme}:redeemed:${merchantId}`,
};

export interface BatchRow {
  psam_id: string;
  batch_number: number;
  terminal_id: string;
  record_count: number;
  total_minor: number;
  currency: number;
  batch_mac: string;
  closed_at: string | null;
  posted: number;
  quarantined: number;
  settlement_day: string;
  received_at: string;
  resubmissions: number;
}

export interface QuarantineRow {
  id: number;
  kind: "record" | "load" | "batch";
  psam_id: string | null;
  batch_number: number | null;
  psam_counter: number | null;
  transaction_id: string | null;
  terminal_id: string | null;
  reason: string;
  content: Buffer;
  digest: string;
  quarantined_at: string;
  /** When the transaction was paid after all (a later record or load of it proved itself): no longer listed as unpaid. */
  resolved_at: string | null;
}

export interface PurchaseRow {
  transaction_id: string;
  psam_id: string;
  psam_counter: number;
  batch_number: number;
  purse_id: string;
  merchant_id: string;
  acquirer_id: string;
  issuer_id: string;
  amount_minor: number;
  currency: number;
  exponent: number;
  settlement_day: string;
  posted_at: string;
}

/** A points redemption posted to its programme's points ledger. */
export interface RedemptionRow {
  transaction_id: string;
  psam_id: string;
  psam_counter: number;
  batch_number: number;
  purse_id: string;
  merchant_id: string;
  programme: number;
  points: number;
  settlement_day: string;
  posted_at: string;
}

export interface LoadRow {
  transaction_id: string;
  bank_id: string;
  purse_id: string;
  issuer_id: string;
  amount_minor: number;
  currency: number;
  exponent: number;
  outcome: string;
  proof: string;
  status: "POSTED" | "NOT_LOADED" | "QUARANTINED";
  reason: string | null;
  digest: string;
  settlement_day: string | null;
  recorded_at: string;
}

/** A sum of a day's postings for one group. */
export type DayTotal<G> = G & { currency: number; exponent: number; total: number; n: number };

export type NewQuarantine = Omit<QuarantineRow, "id" | "resolved_at">;

/** The UTC day of a moment, YYYY-MM-DD. */
export const dayOf = (d: Date) => d.toISOString().slice(0, 10);

/** The day after a YYYY-MM-DD day. */
export function nextDay(day: string): string {
  const d = new Date(`${day}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + 1);
  return dayOf(d);
}

export class ClearingStore {
  constructor(readonly db: Db) {}

  /**
   * The settlement day a posting made now goes to: today (UTC), or the
   * first day after it that is not closed, so nothing lands in a closed day.
   */
  async postingDay(q: Queryable, now: Date): Promise<string> {
    let day = dayOf(now);
    while (await q.get("SELECT 1 AS x FROM settlement_days WHERE day = ?", [day])) day = nextDay(day);
    return day;
  }

  async dayClosedAt(day: string, q: Queryable = this.db): Promise<string | undefined> {
    return (await q.get<{ closed_at: string }>("SELECT closed_at FROM settlement_days WHERE day = ?", [day]))?.closed_at;
  }

  /** Closes a day; closing it again changes nothing. */
  async closeDay(q: Queryable, day: string, now: Date): Promise<void> {
    await q.run("INSERT INTO settlement_days (day, closed_at) VALUES (?, ?) ON CONFLICT (day) DO NOTHING", [day, now.toISOString()]);
  }

  /** The batch of that number clearing accepted first (another, under the same number, means the PSAM's batch key is not the PSAM's alone). */
  batch(psamId: string, batchNumber: number, q: Queryable = this.db): Promise<BatchRow | undefined> {
    return q.get<BatchRow>("SELECT * FROM batches WHERE psam_id = ? AND batch_number = ? ORDER BY seq LIMIT 1", [psamId, batchNumber]);
  }

  /** The accepted batch of that number with exactly this MAC (its count, total and currency). */
  batchWithMac(q: Queryable, psamId: string, batchNumber: number, batchMac: string): Promise<BatchRow | undefined> {
    return q.get<BatchRow>("SELECT * FROM batches WHERE psam_id = ? AND batch_number = ? AND batch_mac = ?", [psamId, batchNumber, batchMac]);
  }

  /** A batch sent again: its counts as this submission left them. */
  async resubmitted(q: Queryable, b: Pick<BatchRow, "psam_id" | "batch_number" | "batch_mac" | "posted" | "quarantined">): Promise<void> {
    await q.run("UPDATE batches SET resubmissions = resubmissions + 1, posted = ?, quarantined = ? WHERE psam_id = ? AND batch_number = ? AND batch_mac = ?", [
      b.posted,
      b.quarantined,
      b.psam_id,
      b.batch_number,
      b.batch_mac,
    ]);
  }

  /** The transaction a PSAM counter's debit was paid for (in money or points), and the batch it came in, if it was paid. */
  postedFrom(q: Queryable, psamId: string, psamCounter: number): Promise<{ transaction_id: string; batch_number: number } | undefined> {
    return q.get(
      `SELECT transaction_id, batch_number FROM purchases WHERE psam_id = ? AND psam_counter = ?
       UNION ALL SELECT transaction_id, batch_number FROM redemptions WHERE psam_id = ? AND psam_counter = ? LIMIT 1`,
      [psamId, psamCounter, psamId, psamCounter],
    );
  }

  /** Whether a debit of this transaction was paid already, as a purchase or as a points redemption: a transaction is paid once, in one unit. */
  async isDebitPaid(q: Queryable, transactionId: string): Promise<boolean> {
    return !!(await q.get(
      "SELECT 1 AS x FROM postings WHERE kind = 'purchase' AND transaction_id = ? UNION ALL SELECT 1 FROM redemptions WHERE transaction_id = ? LIMIT 1",
      [transactionId, transactionId],
    ));
  }

  /** Batch numbers of a PSAM below `below` not accepted yet, lowest first, at most `limit`. */
  async missingBatchNumbers(psamId: string, below: number, limit: number): Promise<number[]> {
    // The usual case, no gap, costs one count.
    const n = await this.db.get<{ n: number }>("SELECT COUNT(DISTINCT batch_number) AS n FROM batches WHERE psam_id = ? AND batch_number < ?", [psamId, below]);
    if ((n?.n ?? 0) >= below - 1) return [];
    const have = new Set(
      (await this.db.all<{ batch_number: number }>("SELECT DISTINCT batch_number FROM batches WHERE psam_id = ? AND batch_number < ?", [psamId, below])).map(
        (r) => r.batch_number,
      ),
    );
    const out: number[] = [];
    for (let n = 1; n < below && out.length < limit; n++) if (!have.has(n)) out.push(n);
    return out;
  }

  /** Records something not paid; the same content quarantined again is kept once. */
  async quarantine(q: Queryable, e: NewQuarantine): Promise<void> {
    await q.run(
      `INSERT INTO quarantine (kind, psam_id, batch_number, psam_counter, transaction_id, terminal_id, reason, content, digest, quarantined_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, digest) DO NOTHING`,
      [e.kind, e.psam_id, e.batch_number, e.psam_counter, e.transaction_id, e.terminal_id, e.reason, e.content, e.digest, e.quarantined_at],
    );
  }

  /** A transaction paid after all: its earlier quarantine entries are no longer what was not paid. */
  async resolveQuarantine(q: Queryable, kind: "record" | "load", transactionId: string, at: string): Promise<void> {
    await q.run("UPDATE quarantine SET resolved_at = ? WHERE kind = ? AND transaction_id = ? AND resolved_at IS NULL", [at, kind, transactionId]);
  }

  /** Posts one transaction's entries, which must sum to zero. */
  async post(
    q: Queryable,
    p: { transactionId: string; kind: "purchase" | "load"; day: string; at: string; currency: number; entries: { account: string; amount: number }[] },
  ): Promise<void> {
    if (p.entries.reduce((s, e) => s + e.amount, 0) !== 0) throw new Error(`posting ${p.transactionId} does not balance`);
    await q.run("INSERT INTO postings (transaction_id, kind, settlement_day, posted_at) VALUES (?, ?, ?, ?)", [p.transactionId, p.kind, p.day, p.at]);
    const seq = (await q.get<{ seq: number }>("SELECT seq FROM postings WHERE kind = ? AND transaction_id = ?", [p.kind, p.transactionId]))!.seq;
    for (const e of p.entries) {
      await q.run("INSERT INTO ledger_entries (posting_seq, account, amount_minor, currency, settlement_day) VALUES (?, ?, ?, ?, ?)", [
        seq,
        e.account,
        e.amount,
        p.currency,
        p.day,
      ]);
    }
  }

  async insertBatch(q: Queryable, b: BatchRow): Promise<void> {
    await q.run(
      `INSERT INTO batches (psam_id, batch_number, terminal_id, record_count, total_minor, currency, batch_mac, closed_at, posted, quarantined,
         settlement_day, received_at, resubmissions, seq)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, (SELECT COALESCE(MAX(seq), 0) + 1 FROM batches WHERE psam_id = ? AND batch_number = ?))`,
      [
        b.psam_id,
        b.batch_number,
        b.terminal_id,
        b.record_count,
        b.total_minor,
        b.currency,
        b.batch_mac,
        b.closed_at,
        b.posted,
        b.quarantined,
        b.settlement_day,
        b.received_at,
        b.psam_id,
        b.batch_number,
      ],
    );
  }

  async insertPurchase(q: Queryable, r: PurchaseRow): Promise<void> {
    await q.run(
      `INSERT INTO purchases (transaction_id, psam_id, psam_counter, batch_number, purse_id, merchant_id, acquirer_id, issuer_id, amount_minor,
         currency, exponent, settlement_day, posted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      [
        r.transaction_id,
        r.psam_id,
        r.psam_counter,
        r.batch_number,
        r.purse_id,
        r.merchant_id,
        r.acquirer_id,
        r.issuer_id,
        r.amount_minor,
        r.currency,
        r.exponent,
        r.settlement_day,
        r.posted_at,
      ],
    );
  }

  /** Posts a points redemption to its programme's points ledger: the redemption and its entries, which must sum to zero. */
  async postRedemption(q: Queryable, r: RedemptionRow, entries: { account: string; points: number }[]): Promise<void> {
    if (entries.reduce((s, e) => s + e.points, 0) !== 0) throw new Error(`redemption ${r.transaction_id} does not balance`);
    await q.run(
      `INSERT INTO redemptions (transaction_id, psam_id, psam_counter, batch_number, purse_id, merchant_id, programme, points, settlement_day, posted_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      [r.transaction_id, r.psam_id, r.psam_counter, r.batch_number, r.purse_id, r.merchant_id, r.programme, r.points, r.settlement_day, r.posted_at],
    );
    const seq = (await q.get<{ seq: number }>("SELECT seq FROM redemptions WHERE transaction_id = ?", [r.transaction_id]))!.seq;
    for (const e of entries) {
      await q.run("INSERT INTO points_entries (redemption_seq, account, programme, points, settlement_day) VALUES (?, ?, ?, ?, ?)", [
        seq,
        e.account,
        r.programme,
        e.points,
        r.settlement_day,
      ]);
    }
  }

  load(q: Queryable, transactionId: string): Promise<LoadRow | undefined> {
    return q.get<LoadRow>("SELECT * FROM loads WHERE transaction_id = ?", [transactionId]);
  }

  /** Drops the row of a load that was never posted (its quarantine entry stays), so that a load of that id that proves itself can be recorded. */
  async forgetLoad(q: Queryable, transactionId: string): Promise<void> {
    await q.run("DELETE FROM loads WHERE transaction_id = ? AND status IN ('QUARANTINED', 'NOT_LOADED')", [transactionId]);
  }

  async insertLoad(q: Queryable, r: LoadRow): Promise<void> {
    await q.run(
      `INSERT INTO loads (transaction_id, bank_id, purse_id, issuer_id, amount_minor, currency, exponent, outcome, proof, status, reason, digest,
         settlement_day, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      [
        r.transaction_id,
        r.bank_id,
        r.purse_id,
        r.issuer_id,
        r.amount_minor,
        r.currency,
        r.exponent,
        r.outcome,
        r.proof,
        r.status,
        r.reason,
        r.digest,
        r.settlement_day,
        r.recorded_at,
      ],
    );
  }

  quarantineOfBatch(psamId: string, batchNumber: number, afterId: number, limit: number): Promise<QuarantineRow[]> {
    return this.db.all<QuarantineRow>(
      "SELECT * FROM quarantine WHERE kind = 'record' AND resolved_at IS NULL AND psam_id = ? AND batch_number = ? AND id > ? ORDER BY id LIMIT ?",
      [psamId, batchNumber, afterId, limit],
    );
  }

  /** The latest rejected submission of a batch number, if any. */
  rejectedBatch(psamId: string, batchNumber: number): Promise<QuarantineRow | undefined> {
    return this.db.get<QuarantineRow>("SELECT * FROM quarantine WHERE kind = 'batch' AND psam_id = ? AND batch_number = ? ORDER BY id DESC LIMIT 1", [
      psamId,
      batchNumber,
    ]);
  }

  quarantined(afterId: number, limit: number): Promise<QuarantineRow[]> {
    return this.db.all<QuarantineRow>("SELECT * FROM quarantine WHERE id > ? AND resolved_at IS NULL ORDER BY id LIMIT ?", [afterId, limit]);
  }

  /** The day's purchases, posted loads and points redemptions, counted. */
  async dayCounts(q: Queryable, day: string): Promise<{ purchases: number; loads: number; redemptions: number }> {
    const r = await q.get<{ purchases: number; loads: number; redemptions: number }>(
      `SELECT (SELECT COUNT(*) FROM purchases WHERE settlement_day = ?) AS purchases,
              (SELECT COUNT(*) FROM loads WHERE status = 'POSTED' AND settlement_day = ?) AS loads,
              (SELECT COUNT(*) FROM redemptions WHERE settlement_day = ?) AS redemptions`,
      [day, day, day],
    );
    return { purchases: r?.purchases ?? 0, loads: r?.loads ?? 0, redemptions: r?.redemptions ?? 0 };
  }

  /** The day's points redemptions, summed per programme and merchant. */
  pointsRedeemedOfDay(q: Queryable, day: string): Promise<{ programme: number; merchant_id: string; points: number; n: number }[]> {
    return q.all(
      `SELECT programme, merchant_id, SUM(points) AS points, COUNT(*) AS n FROM redemptions WHERE settlement_day = ?
       GROUP BY programme, merchant_id ORDER BY programme, merchant_id`,
      [day],
    );
  }

  /** The day's posted loads, summed per bank, issuer and currency. */
  loadsByBank(q: Queryable, day: string): Promise<DayTotal<{ bank_id: string; issuer_id: string }>[]> {
    return q.all(
      `SELECT bank_id, issuer_id, currency, MAX(exponent) AS exponent, SUM(amount_minor) AS total, COUNT(*) AS n FROM loads
       WHERE status = 'POSTED' AND settlement_day = ? GROUP BY bank_id, issuer_id, currency`,
      [day],
    );
  }

  /** The day's purchases, summed per issuer, acquirer and currency. */
  purchasesByAcquirer(q: Queryable, day: string): Promise<DayTotal<{ issuer_id: string; acquirer_id: string }>[]> {
    return q.all(
      `SELECT issuer_id, acquirer_id, currency, MAX(exponent) AS exponent, SUM(amount_minor) AS total, COUNT(*) AS n FROM purchases
       WHERE settlement_day = ? GROUP BY issuer_id, acquirer_id, currency`,
      [day],
    );
  }

  /** The day's purchases summed per merchant (and its acquirer and currency), for the first `limit` merchants after `after` by id. */
  merchantsOfDay(q: Queryable, day: string, after: string, limit: number): Promise<DayTotal<{ merchant_id: string; acquirer_id: string }>[]> {
    return q.all(
      `SELECT merchant_id, acquirer_id, currency, MAX(exponent) AS exponent, SUM(amount_minor) AS total, COUNT(*) AS n FROM purchases
       WHERE settlement_day = ? AND merchant_id IN
         (SELECT DISTINCT merchant_id FROM purchases WHERE settlement_day = ? AND merchant_id > ? ORDER BY merchant_id LIMIT ?)
       GROUP BY merchant_id, acquirer_id, currency ORDER BY merchant_id, acquirer_id, currency`,
      [day, day, after, limit],
    );
  }

  /** A merchant's statement lines, newest first, after the line with posting sequence `beforeSeq`. */
  statement(merchantId: string, day: string | undefined, beforeSeq: number, limit: number): Promise<(PurchaseRow & { seq: number })[]> {
    return this.db.all(
      `SELECT p.*, s.seq FROM purchases p JOIN postings s ON s.kind = 'purchase' AND s.transaction_id = p.transaction_id
       WHERE p.merchant_id = ? AND (CAST(? AS TEXT) IS NULL OR p.settlement_day = ?) AND s.seq < ? ORDER BY s.seq DESC LIMIT ?`,
      [merchantId, day ?? null, day ?? null, beforeSeq, limit],
    );
  }

  statementTotals(merchantId: string, day: string | undefined): Promise<{ currency: number; exponent: number; total: number; n: number }[]> {
    return this.db.all(
      `SELECT currency, MAX(exponent) AS exponent, SUM(amount_minor) AS total, COUNT(*) AS n FROM purchases
       WHERE merchant_id = ? AND (CAST(? AS TEXT) IS NULL OR settlement_day = ?) GROUP BY currency ORDER BY currency`,
      [merchantId, day ?? null, day ?? null],
    );
  }
}

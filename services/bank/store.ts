// The demo bank's books. These accounts stand in for a bank's core system,
// which lies outside netpurse: a real bank server would call its core system
// where this one writes to its own tables. Holds and their resolution are
// the bank server's own business either way.

import type { Db, Queryable } from "../../lib/store/db.js";

/** The bank's tables on PostgreSQL: one schema, which the bank server's replicas and netpurse-bank share. */
export const BANK_SCHEMA = "bank";

export const BANK_MIGRATIONS = [
  `CREATE TABLE accounts (
     account_id TEXT PRIMARY KEY,
     holder TEXT NOT NULL,
     currency INTEGER NOT NULL,
     exponent INTEGER NOT NULL,
     balance_minor INTEGER NOT NULL CHECK (balance_minor >= 0),
     opened_at TEXT NOT NULL
   );
   CREATE TABLE holds (
     transaction_id TEXT PRIMARY KEY,
     account_id TEXT NOT NULL REFERENCES accounts (account_id),
     purse_id TEXT NOT NULL,
     amount_minor INTEGER NOT NULL,
     request_hash TEXT NOT NULL,
     offer BLOB NOT NULL,
     key_nonce BLOB NOT NULL,
     state TEXT NOT NULL,
     created_at TEXT NOT NULL,
     resolved_at TEXT
   );
   CREATE INDEX holds_account ON holds (account_id, state);
   CREATE TABLE statement (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     account_id TEXT NOT NULL REFERENCES accounts (account_id),
     posted_at TEXT NOT NULL,
     text TEXT NOT NULL,
     amount_minor INTEGER NOT NULL,
     balance_after INTEGER NOT NULL,
     transaction_id TEXT
   );
   CREATE INDEX statement_account ON statement (account_id, id);`,
  // The account holder's credentials. Accounts opened before have none and
  // cannot log in until given a password (netpurse-bank set-password).
  `CREATE TABLE credentials (
     account_id TEXT PRIMARY KEY REFERENCES accounts (account_id),
     password_hash TEXT NOT NULL,
     set_at TEXT NOT NULL
   );
   CREATE TABLE access_tokens (
     token_hash TEXT PRIMARY KEY,
     account_id TEXT NOT NULL REFERENCES accounts (account_id),
     issued_at TEXT NOT NULL,
     expires_at TEXT NOT NULL
   );
   CREATE INDEX access_tokens_account ON access_tokens (account_id, issued_at);
   CREATE INDEX access_tokens_expiry ON access_tokens (expires_at);`,
  // Issue #15: an account's holds and access tokens in the order they were made, without SQLite's rowid (PostgreSQL has
  // none). Numbered per account, by the insert itself (its account's highest plus one, in the insert's transaction), so
  // two accounts' offers never contend for one counter. Rows made before are numbered in the order they were made.
  `ALTER TABLE holds ADD COLUMN seq INTEGER;
   UPDATE holds SET seq = (SELECT n FROM (SELECT transaction_id, ROW_NUMBER() OVER (PARTITION BY account_id ORDER BY created_at, transaction_id) AS n
                                            FROM holds) AS ranked
                            WHERE ranked.transaction_id = holds.transaction_id);
   CREATE UNIQUE INDEX holds_account_seq ON holds (account_id, seq);
   ALTER TABLE access_tokens ADD COLUMN seq INTEGER;
   UPDATE access_tokens SET seq = (SELECT n FROM (SELECT token_hash, ROW_NUMBER() OVER (PARTITION BY account_id ORDER BY issued_at, token_hash) AS n
                                                   FROM access_tokens) AS ranked
                                   WHERE ranked.token_hash = access_tokens.token_hash);
   CREATE UNIQUE INDEX access_tokens_account_seq ON access_tokens (account_id, seq);`,
];

export type HoldRowState = "HELD" | "POSTED" | "RELEASED";

export interface AccountRow {
  account_id: string;
  holder: string;
  currency: number;
  exponent: number;
  balance_minor: number;
}

export interface HoldRow {
  transaction_id: string;
  account_id: string;
  purse_id: string;
  amount_minor: number;
  request_hash: string;
  /** The LoadOffer as returned, protobuf. */
  offer: Buffer;
  key_nonce: Buffer;
  state: HoldRowState;
  created_at: string;
}

/** Where a hold stands in an account's list of holds (newest first). */
export interface HoldPosition {
  created_at: string;
  /** The hold's number in its account, in the order the holds were made. */
  seq: number;
}

/** An access token as the bank keeps it: its hash, whose it is, until when. */
export interface AccessTokenRow {
  account_id: string;
  expires_at: string;
}

export interface StatementRow {
  posted_at: string;
  text: string;
  amount_minor: number;
  balance_after: number;
  transaction_id: string | null;
}

export class BankStore {
  constructor(readonly db: Db) {}

  account(id: string, q: Queryable = this.db): Promise<AccountRow | undefined> {
    return q.get<AccountRow>("SELECT * FROM accounts WHERE account_id = ?", [id]);
  }

  accounts(): Promise<AccountRow[]> {
    return this.db.all<AccountRow>("SELECT * FROM accounts ORDER BY account_id");
  }

  /** Posted balance less what is on hold. */
  async available(account: AccountRow, q: Queryable = this.db): Promise<number> {
    const held = await q.get<{ n: number }>("SELECT COALESCE(SUM(amount_minor), 0) AS n FROM holds WHERE account_id = ? AND state = 'HELD'", [
      account.account_id,
    ]);
    return account.balance_minor - (held?.n ?? 0);
  }

  hold(id: string, q: Queryable = this.db): Promise<HoldRow | undefined> {
    return q.get<HoldRow>("SELECT * FROM holds WHERE transaction_id = ?", [id]);
  }

  /** Holds still HELD that were made before `isoTime`. */
  heldSince(isoTime: string): Promise<HoldRow[]> {
    return this.db.all<HoldRow>("SELECT * FROM holds WHERE state = 'HELD' AND created_at < ? ORDER BY created_at", [isoTime]);
  }

  holds(accountId: string, limit: number): Promise<HoldRow[]> {
    return this.db.all<HoldRow>("SELECT * FROM holds WHERE account_id = ? ORDER BY created_at DESC LIMIT ?", [accountId, limit]);
  }

  statement(accountId: string, limit: number): Promise<StatementRow[]> {
    return this.db.all<StatementRow>(
      "SELECT posted_at, text, amount_minor, balance_after, transaction_id FROM statement WHERE account_id = ? ORDER BY id DESC LIMIT ?",
      [accountId, limit],
    );
  }

  /**
   * Up to `limit` holds of the account, newest first (created_at, then seq,
   * both descending: a total order that new holds only extend at the
   * front), starting after `after`, the last hold of the previous page.
   */
  holdsPage(accountId: string, after: HoldPosition | undefined, limit: number): Promise<(HoldRow & HoldPosition)[]> {
    const start = after ? "AND (created_at < ? OR (created_at = ? AND seq < ?))" : "";
    return this.db.all<HoldRow & HoldPosition>(
      `SELECT * FROM holds WHERE account_id = ? ${start} ORDER BY created_at DESC, seq DESC LIMIT ?`,
      after ? [accountId, after.created_at, after.created_at, after.seq, limit] : [accountId, limit],
    );
  }

  /** Records a new hold, HELD, numbered after the account's others (in `q`'s transaction: no other can take its number). */
  async insertHold(q: Queryable, h: Omit<HoldRow, "state">): Promise<void> {
    await q.run(
      `INSERT INTO holds (transaction_id, account_id, purse_id, amount_minor, request_hash, offer, key_nonce, state, created_at, seq)
       VALUES (?, ?, ?, ?, ?, ?, ?, 'HELD', ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM holds WHERE account_id = ?))`,
      [h.transaction_id, h.account_id, h.purse_id, h.amount_minor, h.request_hash, h.offer, h.key_nonce, h.created_at, h.account_id],
    );
  }

  /** Up to `limit` statement lines of the account, newest first (by id), older than line `beforeId` when given. */
  statementPage(accountId: string, beforeId: number | undefined, limit: number): Promise<(StatementRow & { id: number })[]> {
    return this.db.all<StatementRow & { id: number }>(
      `SELECT id, posted_at, text, amount_minor, balance_after, transaction_id FROM statement WHERE account_id = ? ${beforeId === undefined ? "" : "AND id < ?"} ORDER BY id DESC LIMIT ?`,
      beforeId === undefined ? [accountId, limit] : [accountId, beforeId, limit],
    );
  }

  /** Opens a demo account with an opening deposit, and its holder's password hash when given; refuses an id in use. */
  async open(a: { accountId: string; holder: string; currency: number; exponent: number; openingMinor: number; passwordHash?: string }): Promise<void> {
    await this.db.transaction(async (tx) => {
      const now = new Date().toISOString();
      await tx.run("INSERT INTO accounts (account_id, holder, currency, exponent, balance_minor, opened_at) VALUES (?, ?, ?, ?, ?, ?)", [
        a.accountId,
        a.holder,
        a.currency,
        a.exponent,
        a.openingMinor,
        now,
      ]);
      await tx.run("INSERT INTO statement (account_id, posted_at, text, amount_minor, balance_after, transaction_id) VALUES (?, ?, ?, ?, ?, NULL)", [
        a.accountId,
        now,
        "opening deposit",
        a.openingMinor,
        a.openingMinor,
      ]);
      if (a.passwordHash !== undefined)
        await tx.run("INSERT INTO credentials (account_id, password_hash, set_at) VALUES (?, ?, ?)", [a.accountId, a.passwordHash, now]);
    });
  }

  /** Holds of the account still waiting for their confirmation. */
  async heldCount(accountId: string, q: Queryable = this.db): Promise<number> {
    const r = await q.get<{ n: number }>("SELECT COUNT(*) AS n FROM holds WHERE account_id = ? AND state = 'HELD'", [accountId]);
    return r?.n ?? 0;
  }

  /** The account's password hash, if it has one. */
  async passwordHash(accountId: string): Promise<string | undefined> {
    return (await this.db.get<{ password_hash: string }>("SELECT password_hash FROM credentials WHERE account_id = ?", [accountId]))?.password_hash;
  }

  /** Sets (or replaces) an account's password hash; a new password ends every access token of the account. */
  async setPasswordHash(accountId: string, hash: string): Promise<void> {
    await this.db.transaction(async (tx) => {
      await tx.run(
        "INSERT INTO credentials (account_id, password_hash, set_at) VALUES (?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET password_hash = excluded.password_hash, set_at = excluded.set_at",
        [accountId, hash, new Date().toISOString()],
      );
      await tx.run("DELETE FROM access_tokens WHERE account_id = ?", [accountId]);
    });
  }

  /**
   * Records an access token (by its hash), keeping at most `keep` of the
   * account's newest; only if the account's password is still the one the
   * login checked (`passwordHash`), so a login under way when the password
   * changes gets no token. False when it changed.
   */
  async addAccessToken(t: { tokenHash: string; accountId: string; issuedAt: Date; expiresAt: Date }, keep: number, passwordHash: string): Promise<boolean> {
    return this.db.transaction(async (tx) => {
      const current = await tx.get<{ password_hash: string }>("SELECT password_hash FROM credentials WHERE account_id = ?", [t.accountId]);
      if (current?.password_hash !== passwordHash) return false;
      await tx.run(
        `INSERT INTO access_tokens (token_hash, account_id, issued_at, expires_at, seq)
         VALUES (?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM access_tokens WHERE account_id = ?))`,
        [t.tokenHash, t.accountId, t.issuedAt.toISOString(), t.expiresAt.toISOString(), t.accountId],
      );
      await tx.run(
        "DELETE FROM access_tokens WHERE account_id = ? AND token_hash NOT IN (SELECT token_hash FROM access_tokens WHERE account_id = ? ORDER BY issued_at DESC, seq DESC LIMIT ?)",
        [t.accountId, t.accountId, keep],
      );
      return true;
    });
  }

  accessToken(tokenHash: string, q: Queryable = this.db): Promise<AccessTokenRow | undefined> {
    return q.get<AccessTokenRow>("SELECT account_id, expires_at FROM access_tokens WHERE token_hash = ?", [tokenHash]);
  }

  /** Forgets access tokens that expired before `isoTime`; returns how many. */
  async purgeAccessTokens(isoTime: string): Promise<number> {
    return (await this.db.run("DELETE FROM access_tokens WHERE expires_at < ?", [isoTime])).changes;
  }

  /** Turns a hold into a debit of the account, with its statement line; false when it was no longer held. */
  async post(q: Queryable, hold: HoldRow, text: string): Promise<boolean> {
    const now = new Date().toISOString();
    const r = await q.run("UPDATE holds SET state = 'POSTED', resolved_at = ? WHERE transaction_id = ? AND state = 'HELD'", [now, hold.transaction_id]);
    if (!r.changes) return false;
    await q.run("UPDATE accounts SET balance_minor = balance_minor - ? WHERE account_id = ?", [hold.amount_minor, hold.account_id]);
    const { balance_minor } = (await this.account(hold.account_id, q))!;
    await q.run("INSERT INTO statement (account_id, posted_at, text, amount_minor, balance_after, transaction_id) VALUES (?, ?, ?, ?, ?, ?)", [
      hold.account_id,
      now,
      text,
      -hold.amount_minor,
      balance_minor,
      hold.transaction_id,
    ]);
    return true;
  }

  /** Frees a held amount; false when it was no longer held. */
  async release(q: Queryable, hold: HoldRow): Promise<boolean> {
    const r = await q.run("UPDATE holds SET state = 'RELEASED', resolved_at = ? WHERE transaction_id = ? AND state = 'HELD'", [
      new Date().toISOString(),
      hold.transaction_id,
    ]);
    return r.changes === 1;
  }
}

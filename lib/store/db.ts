// The one storage interface every netpurse service writes through. SQL is
// written with `?` placeholders in the subset SQLite and PostgreSQL share;
// the SQLite implementation (better-sqlite3, WAL) is the embedded default.

import Database from "better-sqlite3";
import { chmodSync, closeSync, existsSync, mkdirSync, openSync } from "node:fs";
import { dirname } from "node:path";
import { Mutex } from "../mutex.js";

export type SqlValue = string | number | bigint | Buffer | null;

export interface Queryable {
  run(sql: string, params?: SqlValue[]): Promise<{ changes: number }>;
  get<T>(sql: string, params?: SqlValue[]): Promise<T | undefined>;
  all<T>(sql: string, params?: SqlValue[]): Promise<T[]>;
}

export interface Db extends Queryable {
  /** Runs fn in one transaction: all of its writes land, or none. */
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>;
  close(): Promise<void>;
}

/** Schema changes, applied in order once each. */
export type Migrations = readonly string[];

class SqliteQueryable implements Queryable {
  /** Prepared statements by SQL text: preparing is a large share of a short statement's cost. */
  private readonly statements = new Map<string, Database.Statement>();

  constructor(protected readonly db: Database.Database) {}

  private statement(sql: string): Database.Statement {
    let s = this.statements.get(sql);
    if (!s) {
      s = this.db.prepare(sql);
      this.statements.set(sql, s);
    }
    return s;
  }

  async run(sql: string, params: SqlValue[] = []) {
    const r = this.statement(sql).run(...params);
    return { changes: r.changes };
  }

  async get<T>(sql: string, params: SqlValue[] = []) {
    return this.statement(sql).get(...params) as T | undefined;
  }

  async all<T>(sql: string, params: SqlValue[] = []) {
    return this.statement(sql).all(...params) as T[];
  }
}

class SqliteDb implements Db {
  private readonly q: SqliteQueryable;
  // One connection: transactions and single statements take turns, so a
  // statement never lands inside another caller's open transaction.
  private readonly mutex = new Mutex();

  constructor(private readonly db: Database.Database) {
    this.q = new SqliteQueryable(db);
  }

  run(sql: string, params?: SqlValue[]) {
    return this.mutex.run(() => this.q.run(sql, params));
  }

  get<T>(sql: string, params?: SqlValue[]) {
    return this.mutex.run(() => this.q.get<T>(sql, params));
  }

  all<T>(sql: string, params?: SqlValue[]) {
    return this.mutex.run(() => this.q.all<T>(sql, params));
  }

  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    return this.mutex.run(async () => {
      this.db.exec("BEGIN IMMEDIATE");
      try {
        const out = await fn(this.q);
        this.db.exec("COMMIT");
        return out;
      } catch (e) {
        this.db.exec("ROLLBACK");
        throw e;
      }
    });
  }

  async close() {
    await this.mutex.run(async () => this.db.close());
  }
}

/**
 * Opens (creating if needed) a SQLite database file in WAL mode and applies
 * the migrations. The file is its owner's alone (0600, its folder 0700 when
 * made here): journals, orders and accounts hold secrets, goods and money.
 */
export function openSqlite(path: string, migrations: Migrations): Db {
  if (path !== ":memory:") {
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    closeSync(openSync(path, "a", 0o600));
    // A file made before, or under a loose umask, is narrowed; SQLite gives its -wal and -shm files the database's mode.
    for (const f of [path, `${path}-wal`, `${path}-shm`]) if (existsSync(f)) chmodSync(f, 0o600);
  }
  const db = new Database(path);
  db.pragma("journal_mode = WAL");
  db.pragma("synchronous = FULL"); // money: a committed step survives power loss
  db.pragma("busy_timeout = 5000");
  db.pragma("foreign_keys = ON");
  db.exec("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)");
  const done = new Set((db.prepare("SELECT version FROM schema_migrations").all() as { version: number }[]).map((r) => r.version));
  migrations.forEach((sql, i) => {
    if (done.has(i + 1)) return;
    db.transaction(() => {
      db.exec(sql);
      db.prepare("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)").run(i + 1, new Date().toISOString());
    })();
  });
  return new SqliteDb(db);
}

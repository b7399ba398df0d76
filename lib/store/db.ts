// The one storage interface every netpurse service writes through. SQL is
// written with `?` placeholders in the subset SQLite and PostgreSQL share;
// the SQLite implementation (better-sqlite3, WAL) is the embedded default.
//
// Group commit: SQLite commits without syncing (the statements stay cheap on
// the event loop), and one fdatasync of the write-ahead log on libuv's thread
// pool makes every commit before it durable at once. No call resolves, read
// or write, before everything it wrote or could have seen is on disk, so
// nobody is ever answered from a step a power cut could undo; concurrent
// callers share one sync instead of queueing behind one each.

import Database from "better-sqlite3";
import { chmodSync, closeSync, existsSync, fsyncSync, mkdirSync, openSync } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import { dirname } from "node:path";
import { Mutex } from "../mutex.js";
import { countFsync } from "../stats.js";

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

/** Commits between two checkpoints of the write-ahead log into the database file. */
const CHECKPOINT_EVERY_COMMITS = 1_000;

class SqliteDb implements Db {
  private readonly q: SqliteQueryable;
  // One connection: transactions and single statements take turns, so a
  // statement never lands inside another caller's open transaction.
  private readonly mutex = new Mutex();
  /** Commits made so far, and how many of them are known to be on disk. */
  private committed = 0;
  private synced = 0;
  /** The sync under way: every commit made before it started is durable once it resolves. */
  private syncing: Promise<void> | undefined;
  private wal: FileHandle | undefined;
  private sinceCheckpoint = 0;

  /** `walPath` undefined: nothing to sync (an in-memory database). */
  constructor(
    private readonly db: Database.Database,
    private readonly walPath: string | undefined,
  ) {
    this.q = new SqliteQueryable(db);
  }

  run(sql: string, params?: SqlValue[]) {
    return this.settled(async () => {
      try {
        return await this.q.run(sql, params);
      } finally {
        this.committed++;
      }
    });
  }

  get<T>(sql: string, params?: SqlValue[]) {
    return this.settled(() => this.q.get<T>(sql, params));
  }

  all<T>(sql: string, params?: SqlValue[]) {
    return this.settled(() => this.q.all<T>(sql, params));
  }

  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    return this.settled(async () => {
      this.db.exec("BEGIN IMMEDIATE");
      try {
        const r = await fn(this.q);
        this.db.exec("COMMIT");
        return r;
      } catch (e) {
        this.db.exec("ROLLBACK");
        throw e;
      } finally {
        this.committed++;
      }
    });
  }

  /**
   * Runs a task in its turn, then holds its outcome (an error too: it may
   * rest on what it read) until every commit made so far is on disk.
   */
  private async settled<T>(task: () => Promise<T>): Promise<T> {
    try {
      return await this.mutex.run(task);
    } finally {
      await this.durable(this.committed);
    }
  }

  /** Resolves once commit number `n` (and every one before it) is on disk, sharing syncs with every other caller. */
  private async durable(n: number): Promise<void> {
    if (!this.walPath) return;
    while (this.synced < n) {
      this.syncing ??= this.syncOnce().finally(() => (this.syncing = undefined));
      await this.syncing;
    }
  }

  private async syncOnce(): Promise<void> {
    const target = this.committed;
    this.wal ??= await open(this.walPath!, "r");
    await this.wal.datasync();
    countFsync();
    this.sinceCheckpoint += target - this.synced;
    this.synced = target;
    if (this.sinceCheckpoint >= CHECKPOINT_EVERY_COMMITS) {
      this.sinceCheckpoint = 0;
      this.mutex.run(async () => this.checkpoint()).catch(() => undefined); // retried after the next thousand commits
    }
  }

  /**
   * Copies the log's frames into the database file with SQLite's own syncs
   * (the log first, the database file after), so the log can start over
   * without losing a frame the database file does not hold on disk yet.
   */
  private checkpoint(): void {
    this.db.pragma("synchronous = FULL");
    try {
      this.db.pragma("wal_checkpoint(PASSIVE)");
      countFsync(2);
    } finally {
      this.db.pragma("synchronous = OFF");
    }
  }

  async close() {
    await this.mutex.run(async () => {
      await this.durable(this.committed);
      // The last connection's close checkpoints and deletes the log: with SQLite's own syncs, not without.
      if (this.walPath) this.db.pragma("synchronous = FULL");
      this.db.close();
      await this.wal?.close();
    });
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
  db.pragma("synchronous = FULL"); // the migrations sync as SQLite does; the service's commits are synced below, in groups
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
  if (path === ":memory:") return new SqliteDb(db, undefined);
  // The log exists from the first read on; its folder learns of it durably once, here.
  const dirFd = openSync(dirname(path), "r");
  try {
    fsyncSync(dirFd);
  } finally {
    closeSync(dirFd);
  }
  db.pragma("wal_autocheckpoint = 0"); // checkpoints are SqliteDb's, with their syncs
  db.pragma("synchronous = OFF"); // SqliteDb syncs the log itself before anyone is answered
  return new SqliteDb(db, `${path}-wal`);
}
